"""Output keys and their groups (imgxlate.io.keys): the shard planner cuts only between groups, so any two inputs
that could ever compete for one output key must fall in one group. Properties over random adversarial names."""

import hashlib
import itertools
import random

import pytest

from imgxlate.io import keys, listing
from imgxlate.io.listing import IMAGE_EXTS

EXTS = tuple(e.lower() for e in IMAGE_EXTS)
PARTS = ["a", "a.png", "a.jpg", "a.jpg.png", "a.PNG", "a.b", "b c.png", "ü.png", "a-0123456789.png", "a.png.png",
         "z.png", "0.jpg", "a.tar", ".png.png", "v1.0.png", "v1.1", "a.jpg.jpg", "x.tif", "x.tiff",
         "a.png ", "a.png .png", "a.jpg .png", "a.png -0123456789.png"]     # a trailing space is an input too


def _random_keys(rng: random.Random, n: int) -> list[str]:
    crafted = f"a.png-{hashlib.sha256(b'/src/a.png').hexdigest()[:keys.HASH_HEX[0]]}.png"
    parts = PARTS + [crafted, f"a.jpg-{'f' * keys.HASH_HEX[1]}.png"]
    return sorted({"/".join(rng.choice(parts) for _ in range(rng.randint(1, 3))) for _ in range(n)})


def _canonical_image_keys(ks: list[str]) -> list[str]:
    return [k for k in ks if listing.has_ext(k, EXTS) and not keys.set_aside(k)]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_every_candidate_of_a_key_is_in_the_key_s_group(ext):
    """An input's output key at any level of collision resolution (new extension, source extension kept, a
    10- or 64-hex hash) has the input's group: which is why a cut between groups never splits rivals."""
    rng = random.Random(21)
    for _ in range(300):
        for key in _canonical_image_keys(_random_keys(rng, 8)):
            safe = keys.safe_key(key)
            for level in range(4):
                out = keys.candidate(safe, "/src/" + key, level, "", ext)
                assert keys.group_of(out, EXTS) == keys.group_of(key, EXTS), (key, level, out)
                assert out.startswith(keys.group_of(key, EXTS) + "."), (key, level, out)


@pytest.mark.parametrize("suffix", ["", "_x2", ".hd"])
def test_inputs_that_can_compete_for_an_output_key_share_a_group(suffix):
    """Two inputs whose candidates (at any levels, with any suffix) can be the same output key have one group."""
    rng = random.Random(22)
    for _ in range(300):
        ks = _canonical_image_keys(_random_keys(rng, 10))
        names = {k: {keys.candidate(keys.safe_key(k), "/src/" + k, lv, suffix, ".png") for lv in range(4)}
                 for k in ks}
        for a, b in itertools.combinations(ks, 2):
            if names[a] & names[b]:
                assert keys.group_of(a, EXTS) == keys.group_of(b, EXTS), (a, b, names[a] & names[b])


def test_output_keys_of_a_set_are_unique_and_in_their_inputs_groups():
    rng = random.Random(23)
    for _ in range(300):
        ks = _canonical_image_keys(_random_keys(rng, 12))
        outs = keys.output_keys(ks, ".png", "", ["/src/" + k for k in ks])
        names = [o for o in outs if isinstance(o, str)]
        assert len(set(names)) == len(names)
        for k, o in zip(ks, outs):
            if isinstance(o, str):
                assert keys.group_of(o, EXTS) == keys.group_of(k, EXTS), (k, o)


def test_a_suffix_with_a_slash_or_control_character_is_refused():
    keys.check_suffix("_x2")
    for bad in ("a/b", "a\\b", "x\n"):
        with pytest.raises(ValueError, match="no slashes or control characters"):
            keys.check_suffix(bad)


def test_a_manifest_folder_in_any_case_is_moved_aside():
    # On a case-insensitive DST, _Manifest/ is DST's own _manifest/: its outputs must go elsewhere too.
    names = ["_Manifest/_tmp/b.png", "_MANIFEST/x.png", "_manifest/y.png", "a/_manifest/z.png"]
    assert keys.output_keys(names, ".png") == ["_Manifest_/_tmp/b.png", "_MANIFEST_/x.png", "_manifest_/y.png",
                                               "a/_manifest/z.png"]
    assert keys.in_manifest_folder("_Manifest/x.png") and not keys.in_manifest_folder("a/_manifest/z.png")
