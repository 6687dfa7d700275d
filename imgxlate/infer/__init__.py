"""Inference: a predictor that runs any registered model on decoded arrays, and the Ray Data
pipeline that streams a collection through pools of predictors."""
