"""Field declarations: each value's rule (its valid range) and whether the run id hashes it."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


@dataclass(frozen=True)
class Rule:
    """A check on one config value with the text a message shows: ``must be <text>`` (or ``valid: <choices>``)."""

    text: str
    test: Callable[[Any], bool]
    choices: tuple[str, ...] = ()

    def problem(self, key: str, value: Any) -> Optional[str]:
        """None if ``value`` passes, else one line naming the key, the value and the valid range/choices."""
        try:
            ok = bool(self.test(value))
        except TypeError:  # e.g. a list where a number belongs
            ok = False
        if ok:
            return None
        if self.choices:
            close = difflib.get_close_matches(str(value), self.choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{key}={value!r}; valid: {', '.join(self.choices)}{hint}"
        return f"{key}={value!r}: must be {self.text}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: _number(v) and v > low)


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: _number(v) and v >= low)


def within(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Rule:
    text = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Rule(text, lambda v: _number(v) and (low < v if open_low else low <= v)
                and (v < high if open_high else v <= high))


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, choices)


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.text}", lambda v: v is None or rule.test(v))


def each(rule: Rule, length: Optional[int] = None) -> Rule:
    """A non-empty list (of ``length`` items when given), every item passing ``rule``."""
    size = f"{length} values" if length else "a non-empty list"
    return Rule(f"{size}, each {rule.text}", lambda v: isinstance(v, list) and len(v) == (length or len(v)) > 0
                and all(rule.test(x) for x in v))


def pair(value: Any, low: float, high: float = float("inf")) -> bool:
    """``value`` is ``[a, b]`` with low <= a <= b <= high (rules narrow the ends further)."""
    return (isinstance(value, list) and len(value) == 2 and all(map(_number, value))
            and low <= value[0] <= value[1] <= high)


# How the run id treats a field (the metadata key "hashed"): True, False, or UNLESS_DEFAULT for keys added
# after runs existed, which stay out of the run id at their default so that the old run ids still hold.
UNLESS_DEFAULT = "unless_default"


def _hashing(hashed: Any) -> dict[str, Any]:
    if not (isinstance(hashed, bool) or hashed == UNLESS_DEFAULT):
        raise TypeError(f"hashed={hashed!r}: must be True, False or {UNLESS_DEFAULT!r}")
    return {"hashed": hashed}


def checked(default: Any, rule: Optional[Rule] = None, hashed: Any = True) -> Any:
    """A dataclass field: its default, the rule ``check_values`` tests (None: the type alone), whether it is hashed."""
    metadata = {**_hashing(hashed), **({"check": rule} if rule is not None else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, hashed: bool = True) -> Any:
    """A field holding a whole config section; ``hashed=False`` keeps every key of it out of the run id."""
    return field(default_factory=cls, metadata=_hashing(hashed))


PROBABILITY = within(0, 1)
POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
COUNT = at_least(1)  # a size or count of at least one
OPTIONAL_COUNT = optional(COUNT)
CROP_SCALE = Rule("[low, high] with 0 < low <= high <= 1", lambda v: pair(v, 0, 1) and v[0] > 0)
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
# Lightning precision strings this harness runs (train.precision_settings); short aliases included.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "32", "64", "16", "bf16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
STRATEGIES = ("ddp", "fsdp")  # trainer.strategy: DDP, or FSDP2 (fully_shard) with DINOv2's SHARD_GRAD_OP
WANDB_MODES = ("off", "offline", "online")
LR_SCALING_RULES = ("linear_256", "sqrt_1024")
OPTIMIZERS = ("adamw", "sgd")
TEACHER_TEMP_SCHEDULES = ("per_step", "per_epoch")
POS_EMBED_INTERPOLATIONS = ("timm", "dino")
