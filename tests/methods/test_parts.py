"""The parts methods are composed of, each against an independent computation, and old checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from ssl_bench import config as config_lib
from ssl_bench.data.batch import Batch
from ssl_bench.losses import sinkhorn_knopp, teacher_targets
from ssl_bench.methods import METHODS, build_method
from ssl_bench.methods.dino import DINO
from ssl_bench.methods.parts import CenteringTargets, SinkhornKnoppTargets, ZeroCenterTargets
from tests.methods.test_methods import _crops, _step


def _method(tiny_tree, name, drop_path_rate=0.0, **method):
    torch.manual_seed(0)  # the same initial weights for every method of a comparison
    return build_method(config_lib.build_config(tiny_tree, {"method": {"name": name, **method},
                                                            "backbone": {"drop_path_rate": drop_path_rate, "depth": 2}}))


def _logged_step(method, crops):
    logged = {}
    method.log = lambda key, value, **k: logged.__setitem__(key, value)
    method.log_dict = lambda values, **k: logged.update(values)
    torch.manual_seed(1)  # the same drop-path draws in every method's student forward
    _step(method, crops)
    return {k: torch.as_tensor(v).detach() for k, v in logged.items()}


def test_centering_targets_center_then_update_after():
    part = CenteringTargets.build(config_lib.build_config({}).method, 3)
    logits = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    part.update(logits)  # center 0.1 * mean = (0.2, 0.1, 0.05)
    torch.testing.assert_close(part.center, torch.tensor([[0.2, 0.1, 0.05]]))
    torch.testing.assert_close(part.probs(logits, 0.5), F.softmax((logits - part.center) / 0.5, dim=-1))


def test_zero_center_and_sinkhorn_keep_no_moving_state():
    m = config_lib.build_config({}).method
    logits = torch.randn(6, 5)
    zero = ZeroCenterTargets.build(m, 5)
    zero.update(logits + 10)
    assert zero.center.abs().sum() == 0
    torch.testing.assert_close(zero.probs(logits, 0.04), teacher_targets(logits, torch.zeros(5), 0.04))
    sk = SinkhornKnoppTargets.build(m, 5)
    sk.update(logits)
    assert dict(sk.state_dict()) == {}
    torch.testing.assert_close(sk.probs(logits, 0.04), sinkhorn_knopp(logits, 0.04, m.sinkhorn_iterations))


def _koleo_by_hand(features):
    """-mean log(distance to the nearest other sample) of L2-normalised rows, with torch.cdist."""
    x = F.normalize(features, dim=-1)
    distances = torch.cdist(x, x) + torch.diag(torch.full((len(x),), float("inf")))
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


def test_dino_koleo_is_dino_plus_weighted_koleo(tiny_tree):
    # Drop path (timm: rates 0, 0.5 over 2 blocks) makes the student's features differ from the teacher's.
    dino = _method(tiny_tree, "dino", drop_path_rate=0.5)
    with_koleo = _method(tiny_tree, "dino_koleo", drop_path_rate=0.5, koleo_weight=0.5)
    crops = _crops(dino.cfg)
    torch.manual_seed(1)  # the drop-path draws of the step's student forward of the global views
    with torch.no_grad():
        cls = with_koleo.student.backbone(torch.cat(crops[:2])).cls
    koleo = sum(_koleo_by_hand(c) for c in cls.chunk(2))
    plain, logged = _logged_step(dino, crops), _logged_step(with_koleo, crops)
    assert abs(koleo.item()) > 0.1  # a term that could hide in the tolerance would prove nothing
    torch.testing.assert_close(logged["train/loss_dino"], plain["train/loss"])
    torch.testing.assert_close(logged["train/loss_koleo"], koleo)
    torch.testing.assert_close(logged["train/loss"], plain["train/loss"] + 0.5 * koleo)
    assert not with_koleo.uses_masks and "train/masked_patches" not in logged


def test_a_method_is_its_parts():
    parts = {name: (METHODS.get(name).targets, [t.__name__ for t in METHODS.get(name).terms])
             for name in ("dino", "dino_sinkhorn", "dino_koleo", "dinov2", "ibot")}
    assert parts == {"dino": (CenteringTargets, []), "dino_sinkhorn": (SinkhornKnoppTargets, []),
                     "dino_koleo": (CenteringTargets, ["KoLeo"]),
                     "dinov2": (SinkhornKnoppTargets, ["IBOTSinkhorn", "KoLeo"]), "ibot": (CenteringTargets, ["IBOT"])}
    assert all(issubclass(METHODS.get(name), DINO) for name in METHODS.names())  # one training step for all
    assert METHODS.get("dinov2").uses_masks and not METHODS.get("dinov2_no_ibot").uses_masks


@pytest.mark.parametrize("name,dummies", [("dino_sinkhorn", ["centering.center"]),
                                          ("dinov2", ["centering.center", "patch_centering.center"]),
                                          ("dinov2_no_ibot", ["centering.center", "patch_centering.center"])])
def test_checkpoints_with_the_old_dummy_centers_still_load(tiny_tree, name, dummies):
    """Before the parts, Sinkhorn-Knopp methods kept an unused zero center (NoCentering)."""
    method = _method(tiny_tree, name)
    state = method.state_dict()
    dim = method.cfg.method.out_dim
    old = {**state, **{key: torch.zeros(1, dim) for key in dummies}}
    method.load_state_dict(old)  # strict: the zero dummies are dropped, nothing else is
    assert not [k for k in method.state_dict() if "center" in k]
    with pytest.raises(RuntimeError, match="Unexpected key.*centering.center"):
        method.load_state_dict({**state, "centering.center": torch.ones(1, dim)})  # a real center: another method
    with pytest.raises(RuntimeError, match="Missing key"):
        method.load_state_dict({k: v for k, v in old.items() if not k.startswith("teacher.head.")})


def test_dino_checkpoint_keeps_its_center_key(tiny_tree):
    method = _method(tiny_tree, "dino")
    _step(method, _crops(method.cfg))
    center = method.state_dict()["centering.center"]
    assert center.abs().sum() > 0
    fresh = _method(tiny_tree, "dino")
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.centering.center, center)


def test_training_step_reads_a_typed_batch_and_a_plain_tuple_alike(tiny_tree):
    a, b = _method(tiny_tree, "dino"), _method(tiny_tree, "dino")
    crops = _crops(a.cfg)
    typed = _logged_step(a, crops)
    original = b.training_step
    b.training_step = lambda batch, i: original((batch.crops, batch.labels), i)  # what bench/train.py feeds
    assert isinstance(Batch(crops, torch.zeros(4)), tuple)
    torch.testing.assert_close(_logged_step(b, crops)["train/loss"], typed["train/loss"])
