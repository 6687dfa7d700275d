#!/usr/bin/env bash
# Seconds from `imgxlate translate`'s start to its first output file, and to its exit, over scikit-image's 7
# sample photos (max side 256) with sr-x2 and the defaults: --pipeline auto (a run this small runs in the driver's
# process, without Ray) against --pipeline fused (Ray, one actor per CPU), alternating, RUNS times each.
#   bash jobs/bench_first_output.sh [OUT=out/bench_first_output] [RUNS=3]
source "$(dirname "$0")/env.sh"
OUT="${1:-out/bench_first_output}"; RUNS="${2:-3}"
rm -rf "$OUT" && imgxlate sample-photos "$OUT/photos" --max-side 256 > /dev/null
for i in $(seq "$RUNS"); do
  for mode in auto fused; do
    rm -rf "$OUT/out"
    t0=$(date +%s.%N)
    imgxlate translate "$OUT/photos" "$OUT/out" --model sr-x2 --pipeline "$mode" > "$OUT/log-$mode-$i.txt" 2>&1 &
    pid=$!
    until [ -n "$(find "$OUT/out" -name '*.png' -not -path '*/_manifest/*' 2>/dev/null | head -1)" ] \
        || ! kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
    t1=$(date +%s.%N)
    rc=0; wait "$pid" || rc=$?
    t2=$(date +%s.%N)
    python -c "print(f'$mode run $i: exit {$rc}, first output {$t1 - $t0:.2f} s, exit {$t2 - $t0:.2f} s')"
  done
done
