"""Typed configs (fields declare their check and hashing), YAML + ``key=value`` loading, run ids; names re-exported."""

from ssl_bench.config.checks import (check_values, cross_field_problems, field_problems,  # noqa: F401
                                     images_per_step, is_vit_name, one_step_problem,
                                     rank_batch_size, rank_batch_terms)
from ssl_bench.config.hashing import HASHED_UNLESS_DEFAULT, UNHASHED_KEYS, config_hash, run_id  # noqa: F401
from ssl_bench.config.loading import (BASE_KEY, UniqueKeyLoader, build_config, check_base,  # noqa: F401
                                      check_keys, deep_merge, from_dict, load_config, load_config_tree,
                                      parse_overrides, read_yaml, set_dotted)
from ssl_bench.config.rules import (ACCELERATORS, LR_SCALING_RULES, OPTIMIZERS,  # noqa: F401
                                    POS_EMBED_INTERPOLATIONS, PRECISIONS, TEACHER_TEMP_SCHEDULES,
                                    UNLESS_DEFAULT, WANDB_MODES, ConfigError, Rule, checked, section)
from ssl_bench.config.schema import get_dotted, to_dict, to_yaml  # noqa: F401
from ssl_bench.config.sections import (DINOV2_LINEAR_LRS, AugConfig, BackboneConfig, Config,  # noqa: F401
                                       DataConfig, EvalConfig, LinearConfig, MethodConfig, OptimConfig,
                                       SpeedConfig, TrackingConfig, TrainConfig, TrainerConfig)
from ssl_bench.config.study import STUDY_NAME_RULE, STUDY_NAME_TEXT, check_study_name, run_dir  # noqa: F401
