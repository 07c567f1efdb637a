"""Each field declares its check and hashing; the unhashed keys and the section classes are derived."""

import dataclasses
from dataclasses import dataclass

import pytest

from ssl_bench import config as config_lib
from ssl_bench.config.hashing import declared
from ssl_bench.config.rules import UNLESS_DEFAULT, checked, section
from ssl_bench.config.schema import get_dotted, subsections, walk

# The hand-kept tuple and dict of ssl_bench/config.py before issue 17, written out literally.
OLD_UNHASHED_KEYS = ("study", "data.num_workers", "tracking", "speed", "trainer.num_threads",
                     "train.diagnostics_every_n_steps", "train.checkpoint_every_n_steps", "train.resume",
                     "train.fp16_max_consecutive_skips",
                     "eval.knn_every_n_epochs", "eval.knn_fp16_bank", "eval.knn_bank_block", "eval.cache_features",
                     "linear",
                     "data.augment_on")  # added since (issue 18): where the tensor crops are made, not what they are
# The two keys hand-kept before issue 17, plus the keys added since (each one here on purpose: a key
# that changes results but keeps old run ids at its default).
OLD_HASHED_UNLESS_DEFAULT = {"method.teacher_temp_schedule": "per_step", "backbone.pos_embed_interpolation": "timm",
                             "data.multicrop": "pil", "backbone.stem_stride": 1,
                             "optim.accumulate_grad_batches": 1,
                             "backbone.sync_batchnorm": False, "trainer.strategy": "ddp"}
CHANGED = "<changed>"  # config_hash serialises any value, so a sentinel tests every field without a valid value


def test_derived_unhashed_keys_equal_the_old_hand_kept_tuple():
    assert len(config_lib.UNHASHED_KEYS) == len(set(config_lib.UNHASHED_KEYS))
    assert set(config_lib.UNHASHED_KEYS) == set(OLD_UNHASHED_KEYS)
    assert config_lib.HASHED_UNLESS_DEFAULT == OLD_HASHED_UNLESS_DEFAULT


def _leaves():
    return [key for key, _ in walk() if not dataclasses.is_dataclass(get_dotted(config_lib.Config(), key))]


def _hash_with(key, value):
    cfg = config_lib.Config()
    parent, _, name = key.rpartition(".")
    setattr(get_dotted(cfg, parent) if parent else cfg, name, value)
    return config_lib.config_hash(cfg)


@pytest.mark.parametrize("key", _leaves())
def test_every_field_moves_the_run_id_exactly_when_hashed(key):
    default = config_lib.config_hash(config_lib.Config())
    unhashed = any(key == old or key.startswith(f"{old}.") for old in OLD_UNHASHED_KEYS)
    assert (_hash_with(key, CHANGED) == default) == unhashed, key
    if key in OLD_HASHED_UNLESS_DEFAULT:  # hashed, but at its default it leaves the old run ids alone
        assert _hash_with(key, OLD_HASHED_UNLESS_DEFAULT[key]) == default


@dataclass
class _Part:
    kept: int = 1
    dropped: int = checked(2, hashed=False)
    added_later: str = checked("old", hashed=UNLESS_DEFAULT)


@dataclass
class _Schema:
    part: _Part = section(_Part)
    quiet: _Part = section(_Part, hashed=False)
    name: str = checked("x", config_lib.Rule("non-empty", bool), hashed=False)


def test_a_new_field_is_picked_up_from_its_declaration_alone():
    assert list(declared(_Schema, False)) == ["part.dropped", "quiet", "name"]  # quiet's own keys are not walked
    assert list(declared(_Schema, UNLESS_DEFAULT)) == ["part.added_later"]
    assert subsections(_Schema) == {"part": _Part, "quiet": _Part}  # from the field types, no class list


def test_subsections_reach_nested_keys_without_a_class_list():
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'part\.kep'.*did you mean 'part\.kept'"):
        config_lib.check_keys({"part": {"kep": 1}}, _Schema)
    assert subsections(config_lib.DataConfig) == {"aug": config_lib.AugConfig}


@pytest.mark.parametrize("hashed", ["maybe", None, 1])
def test_hashed_takes_only_true_false_or_unless_default(hashed):
    with pytest.raises(TypeError, match="hashed="):
        checked(1, hashed=hashed)


def test_checks_stay_with_their_fields():
    fields = dict(walk())
    assert fields["data.num_workers"].metadata["hashed"] is False
    assert "check" in fields["data.num_workers"].metadata  # a rule and hashed=False in one declaration
    with pytest.raises(config_lib.ConfigError, match=r"data\.num_workers=-1: must be >= 0"):
        config_lib.load_config(None, ["data.num_workers=-1"])
