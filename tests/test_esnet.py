"""ES-Net composition: shared trunk, separate branches, which parameters each loss reaches,
the training forward with each eraser, and one optimisation step lowering the loss."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from esreid.config import EraseConfig, LossConfig, ModelConfig
from esreid.engine.objective import TrainingObjective, branch_loss, total_loss
from esreid.losses import weighted_regularized_triplet_loss
from esreid.models.backbone import build_resnet
from esreid.models.esnet import BranchOutput, ESNet, TrainOutput, build_model
from esreid.models.heads import BNNeck
from esreid.models.non_local import NonLocal
from esreid.models.pooling import GlobalAvgPool, GlobalMaxPool, PPooling
from esreid.saliency.cgram import batch_cg_ram

TINY = dict(backbone="resnet10", pretrained="none")


def _model(erase="besm", num_classes=4, **kw):
    cfg = ModelConfig(**{**TINY, **kw})
    return build_model(cfg, num_classes, EraseConfig(method=erase, ratio=0.2, prob=1.0))


def _has_contrast(maps):
    """The maps BESM erases from: not constant (an all-zero map names no salient part)."""
    flat = maps.flatten(1)
    return flat.amax(1) > flat.amin(1)


def _batch(n_ids=4, k=2, h=32, w=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_ids * k, 3, h, w, generator=g)
    pids = torch.arange(n_ids).repeat_interleave(k)
    return images, pids


def test_structure_shared_trunk_separate_branches():
    model = _model()
    assert [n for n, _ in model.trunk.named_children()] == ["stem", "layer1", "layer2"]
    assert model.aib.stage_names == ["layer3", "layer4"] == model.esb.stage_names
    aib_params = {id(p) for p in model.aib.parameters()}
    esb_params = {id(p) for p in model.esb.parameters()}
    trunk_params = {id(p) for p in model.trunk.parameters()}
    assert not aib_params & esb_params and not trunk_params & (aib_params | esb_params)
    # Both branches start from the same weights.
    for (n1, p1), (n2, p2) in zip(model.aib.stages.named_parameters(),
                                  model.esb.stages.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert isinstance(model.esb.pool, PPooling)
    assert not isinstance(model.aib.pool, PPooling)
    model.eval()
    images, _ = _batch()
    assert model(images).shape == (8, 2 * 512) and model.descriptor_dim == 1024


def test_split_point_is_configurable():
    model = _model(split="layer4")
    assert [n for n, _ in model.trunk.named_children()] == ["stem", "layer1", "layer2", "layer3"]
    assert model.esb.stage_names == ["layer4"]


def _grads_after(loss, model):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in model.named_parameters()}


def test_each_branch_loss_reaches_its_branch_and_the_trunk_only():
    model = _model()
    model.train()
    images, pids = _batch()
    out = model.forward_train(images, pids, generator=torch.Generator().manual_seed(1))
    # prob=1: every image whose map has contrast (some fresh maps are all zero).
    assert torch.equal(out.was_erased, _has_contrast(out.saliency)) and bool(out.was_erased.any())
    cfg = LossConfig()
    for name, other in (("aib", "esb"), ("esb", "aib")):
        loss = sum(branch_loss(out.branches[name], pids, cfg).values())
        reached = _grads_after(loss, model)
        assert any(v for n, v in reached.items() if n.startswith(f"{name}."))
        assert any(v for n, v in reached.items() if n.startswith("trunk."))
        assert not any(v for n, v in reached.items() if n.startswith(f"{other}."))
    # The BNNeck shift stays frozen; P-pooling's exponent is learned by the ESB loss.
    assert not model.esb.neck.bn.bias.requires_grad
    assert reached is not None


def test_ppool_exponent_gets_gradient_from_esb_loss():
    model = _model()
    images, pids = _batch()
    out = model.forward_train(images, pids)
    loss = sum(branch_loss(out.branches["esb"], pids, LossConfig()).values())
    params = [p for p in model.esb.pool.parameters()]
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_erased_images_feed_the_esb_only():
    model = _model()
    images, pids = _batch()
    out = model.forward_train(images, pids, generator=torch.Generator().manual_seed(0))
    erased_count = (out.erased_images != images).any(1).flatten(1).sum(1)
    assert bool(out.was_erased.any())
    assert torch.equal(erased_count, out.was_erased.long() * round(0.2 * 32 * 16))
    # The AIB output equals a forward of the clean images through the trunk + AIB.
    ref = model.aib(model.trunk(images))
    assert torch.allclose(out.branches["aib"].feat, ref.feat, atol=1e-5)


def test_saliency_pass_leaves_gradients_untouched():
    model = _model()
    images, pids = _batch()
    for p in model.parameters():
        p.grad = None
    maps = model.saliency_maps(images, pids)
    assert maps.shape == (8, 2, 1)  # layer4 of a 32x16 input at last stride 1
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["none", "besm", "random", "gradcam", "bfd"])
def test_every_eraser_runs_a_training_forward(method):
    model = _model(erase=method)
    images, pids = _batch()
    out = model.forward_train(images, pids, generator=torch.Generator().manual_seed(0))
    loss, parts = total_loss(out, pids, LossConfig())
    assert torch.isfinite(loss)
    assert set(parts) == {"id_aib", "triplet_aib", "id_esb", "triplet_esb"}


def test_single_branch_models():
    base = build_model(ModelConfig(**TINY, esb=False), 4)
    assert base.esb is None and base.descriptor_dim == 512
    images, pids = _batch()
    out = base.forward_train(images, pids)
    assert set(out.branches) == {"aib"} and out.was_erased is None
    with pytest.raises(ValueError, match="needs an ESB"):
        build_model(ModelConfig(**TINY, esb=False), 4, EraseConfig(method="besm"))


def test_one_training_step_decreases_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _model()
    model.train()
    images, pids = _batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = LossConfig()

    def loss_now():
        # The same erasing draw each time, so only the parameters change.
        out = model.forward_train(images, pids, generator=torch.Generator().manual_seed(5))
        return total_loss(out, pids, cfg)[0]

    before = loss_now()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_now()
    assert float(after.detach()) < 0.9 * float(before.detach())


@pytest.mark.parametrize("reuse_clean", [True, False])
def test_esb_input_for_partly_erased_batch(reuse_clean):
    cfg = ModelConfig(**TINY)
    erase = EraseConfig(method="besm", ratio=0.3, prob=0.5, reuse_clean=reuse_clean)
    model = build_model(cfg, 4, erase).eval()  # eval: BatchNorm does not couple the samples
    images, pids = _batch()
    out = model.forward_train(images, pids, generator=torch.Generator().manual_seed(3))
    was = out.was_erased
    assert 0 < int(was.sum()) < len(was)
    # Unerased images are untouched in I*, so either way the ESB sees trunk(I*).
    expected = model.esb(model.trunk(out.erased_images))
    assert torch.equal(out.erased_images[~was], images[~was])
    assert torch.allclose(out.branches["esb"].feat, expected.feat, atol=1e-5)


@pytest.mark.parametrize("aib_pool, esb_pool, per_channel, expected", [
    ("gap", "ppool", False, {"esb.pool.raw_l"}),
    ("ppool", "ppool", True, {"aib.pool.raw_l", "esb.pool.raw_l"}),
    ("gap", "gmp", False, set()),
])
def test_no_weight_decay_names_each_p_pooling_exponent(aib_pool, esb_pool, per_channel, expected):
    model = _model(erase="none", aib_pool=aib_pool, esb_pool=esb_pool, ppool_per_channel=per_channel)
    assert model.no_weight_decay() == expected
    assert expected <= dict(model.named_parameters()).keys()


def _hand_outputs():
    """Two branches' outputs with fixed values, as a training forward would return them."""
    g = torch.Generator().manual_seed(3)
    branches = {}
    for name in ("aib", "esb"):
        feat = torch.randn(6, 4, generator=g)
        branches[name] = BranchOutput(feat=feat, bn_feat=2 * feat,
                                      logits=torch.randn(6, 5, generator=g))
    return TrainOutput(branches=branches, info={"erased_fraction": 0.25})


def _smoothed_ce(logits, pids, eps):
    # Bag of Tricks: target (1 - eps) * onehot + eps / C, written out.
    q = torch.full_like(logits, eps / logits.shape[1])
    q[torch.arange(len(pids)), pids] += 1 - eps
    return -(q * logits.log_softmax(1)).sum(1).mean()


def _batch_hard(feat, pids, margin):
    # Hardest positive and negative of each anchor from the Euclidean distances, written out.
    losses = []
    for i in range(len(pids)):
        d = ((feat - feat[i]) ** 2).sum(1).sqrt()
        pos = [float(d[j]) for j in range(len(pids)) if pids[j] == pids[i] and j != i]
        neg = [float(d[j]) for j in range(len(pids)) if pids[j] != pids[i]]
        losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses)


def test_eq1_is_each_branch_ce_plus_triplet_summed():
    # Not the defaults, so that a term taking a fixed value instead of the configured one
    # (or another branch's output) changes the result.
    cfg = LossConfig(label_smooth=0.3, margin=2.5)
    out, pids = _hand_outputs(), torch.tensor([0, 0, 1, 1, 2, 2])
    loss, parts = total_loss(out, pids, cfg)
    expected = {}
    for name, b in out.branches.items():
        expected[f"id_{name}"] = float(_smoothed_ce(b.logits, pids, 0.3))
        expected[f"triplet_{name}"] = _batch_hard(b.feat, pids, 2.5)
    assert parts == pytest.approx(expected, rel=1e-5)
    assert min(expected.values()) > 0  # every term counts in the sum below
    assert float(loss) == pytest.approx(sum(expected.values()), rel=1e-5)


def test_eq1_without_triplet_and_with_the_weighted_triplet():
    out, pids = _hand_outputs(), torch.tensor([0, 0, 1, 1, 2, 2])
    loss, parts = total_loss(out, pids, LossConfig(triplet=False))
    ce = {f"id_{n}": float(_smoothed_ce(b.logits, pids, 0.1)) for n, b in out.branches.items()}
    assert parts == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(sum(ce.values()), rel=1e-5)
    _, parts = total_loss(out, pids, LossConfig(triplet_kind="weighted"))
    for name, b in out.branches.items():
        assert parts[f"triplet_{name}"] == pytest.approx(
            float(weighted_regularized_triplet_loss(b.feat, pids)), rel=1e-6)


def test_training_objective_returns_eq1_its_detached_terms_and_the_eraser_info():
    class _Fixed(torch.nn.Module):
        """Stands in for ESNet: forward_train returns fixed outputs whose features need grad."""

        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward_train(self, images, pids, generator=None):
            self.seen = (images, pids, generator)
            return self.out

    out, pids = _hand_outputs(), torch.tensor([0, 0, 1, 1, 2, 2])
    for b in out.branches.values():
        b.feat.requires_grad_(True)
        b.logits.requires_grad_(True)
    cfg = LossConfig(label_smooth=0.2, margin=1.0)
    model, images, generator = _Fixed(out), torch.zeros(6, 3, 8, 4), torch.Generator()
    loss, terms, info = TrainingObjective(model, cfg)(images, pids, generator)
    # The erasing draw uses the caller's generator (seeded runs repeat their erasing).
    assert model.seen[0] is images and model.seen[1] is pids and model.seen[2] is generator
    expected_loss, expected_parts = total_loss(out, pids, cfg)
    assert set(terms) == set(expected_parts)
    assert {k: float(v) for k, v in terms.items()} == pytest.approx(expected_parts, rel=1e-6)
    assert all(not v.requires_grad for v in terms.values())
    assert float(loss.detach()) == pytest.approx(sum(expected_parts.values()), rel=1e-6)
    assert loss.requires_grad and info == {"erased_fraction": 0.25}


def test_bnneck_is_an_unshifted_batch_norm_then_a_bias_free_classifier():
    torch.manual_seed(0)
    neck = BNNeck(256, 300)
    # Bag of Tricks: the BN shift is fixed at 0 (never trained), the scale starts at 1, the
    # classifier has no bias and starts from N(0, 0.001^2).
    assert not neck.bn.bias.requires_grad and torch.equal(neck.bn.bias, torch.zeros(256))
    assert neck.bn.weight.requires_grad and torch.equal(neck.bn.weight, torch.ones(256))
    assert neck.classifier.bias is None and neck.classifier.weight.shape == (300, 256)
    w = neck.classifier.weight.detach()
    assert float(w.std()) == pytest.approx(0.001, rel=0.02) and abs(float(w.mean())) < 1e-5
    feat = 3 + 2 * torch.randn(8, 256)
    bn_feat, logits = neck.train()(feat)
    # Training mode: each dimension standardised over the batch (biased variance).
    mean, var = feat.mean(0), feat.var(0, unbiased=False)
    torch.testing.assert_close(bn_feat, (feat - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(logits, bn_feat @ neck.classifier.weight.t())


# --- Branch, ESNet and build_model pinned down piece by piece --------------------------------


def test_branch_head_resumes_after_a_named_stage_and_rejects_unknown_ones():
    model = _model(erase="none").eval()
    images, _ = _batch()
    b = model.esb
    with torch.no_grad():
        shared = model.trunk(images)
        full = b(shared)
        after3 = b.stages.layer3(shared)
        fmap3 = b.feature_map(shared, upto="layer3")
        resumed = b.head(fmap3, after="layer3")  # layer4, pooling and BNNeck still to run
        last = b.head(b.stages.layer4(after3), after="layer4")  # nothing left to run
    assert torch.equal(fmap3, after3) and fmap3.shape[1] == 256  # resnet10's layer3 width
    for got in (resumed, last):
        for key in ("feat", "bn_feat", "logits"):
            torch.testing.assert_close(getattr(got, key), getattr(full, key))
    assert full.feat.shape == (8, 512) and full.logits.shape == (8, 4)
    with pytest.raises(ValueError, match=r"^stage 'layer5' is not in this branch "
                                         r"\(\['layer3', 'layer4'\]\)$"):
        b.head(fmap3, after="layer5")


def test_esnet_needs_a_branch_and_an_esb_only_model_works():
    with pytest.raises(ValueError, match=r"^ESNet needs at least one branch$"):
        ESNet(torch.nn.Identity(), None, None)
    with pytest.raises(ValueError, match=r"^erase.method=besm needs an ESB$"):
        build_model(ModelConfig(**TINY, esb=False), 4, EraseConfig(method="besm"))
    assert list(_model(erase="none").branches()) == ["aib", "esb"]
    model = build_model(ModelConfig(**TINY, aib=False), 4, EraseConfig(method="none"))
    assert model.aib is None and list(model.branches()) == ["esb"]
    images, pids = _batch()
    out = model.forward_train(images, pids)
    assert set(out.branches) == {"esb"} and out.info == {} and out.was_erased is None
    model.eval()
    with torch.no_grad():
        expected = model.esb(model.trunk(images)).bn_feat
        torch.testing.assert_close(model(images), expected)
    assert model.descriptor_dim == 512


def test_descriptor_concatenates_the_aib_then_the_esb_bnneck_features():
    model = _model(erase="none").eval()
    images, _ = _batch()
    with torch.no_grad():
        # Make the two branches differ, so that their order in the descriptor shows.
        model.esb.neck.bn.weight.mul_(3.0)
        shared = model.trunk(images)
        expected = torch.cat([model.aib(shared).bn_feat, model.esb(shared).bn_feat], dim=1)
        torch.testing.assert_close(model(images), expected)


def test_build_model_num_classes_bounds():
    model = build_model(ModelConfig(**TINY), 1)
    assert model.aib.neck.classifier.out_features == 1 == model.esb.neck.classifier.out_features
    with pytest.raises(ValueError, match=r"^num_classes must be >= 1, got 0$"):
        build_model(ModelConfig(**TINY), 0)


def test_build_model_loads_the_backbone_weights_into_both_branches_and_sets_last_stride(tmp_path):
    torch.manual_seed(0)
    ref = build_resnet("resnet10", "none", 1)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)  # a fresh init would differ from ref
    cfg = ModelConfig(backbone="resnet10", pretrained=str(tmp_path / "w.pt"), last_stride=2)
    model = build_model(cfg, 4)
    assert torch.equal(model.trunk.stem[0].weight, ref.conv1.weight)
    assert torch.equal(model.trunk.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
    for b in (model.aib, model.esb):
        assert torch.equal(b.stages.layer4[0].conv2.weight, ref.layer4[0].conv2.weight)
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        # layer3 ends at 1/16 of the input; layer4 halves it again with last stride 2 ...
        assert model.esb.feature_map(model.trunk(images)).shape == (2, 512, 2, 1)
        # ... and keeps it with the default last stride 1.
        plain = _model(erase="none")
        assert plain.esb.feature_map(plain.trunk(images)).shape == (2, 512, 4, 2)


def test_ppool_options_reach_the_pooling_and_other_poolings_take_none():
    model = _model(erase="none", ppool_init=2.0)
    assert isinstance(model.aib.pool, GlobalAvgPool)
    assert model.esb.pool.l.shape == () and float(model.esb.pool.l.detach()) == pytest.approx(2.0)
    model = _model(erase="none", ppool_init=2.5, ppool_per_channel=True, aib_pool="gmp")
    assert isinstance(model.aib.pool, GlobalMaxPool)
    torch.testing.assert_close(model.esb.pool.l.detach(), torch.full((512,), 2.5))


def test_a_model_config_without_the_agw_fields_builds_the_plain_resnet():
    # build_model falls back to no non-local blocks and the usual stem (with its ReLU) for a
    # model config that predates model.non_local and model.agw_published_quirks.
    fields = {f.name: getattr(ModelConfig(**TINY), f.name) for f in dataclasses.fields(ModelConfig)
              if f.name not in ("non_local", "agw_published_quirks")}
    model = build_model(SimpleNamespace(**fields), 4)
    assert [type(m) for m in model.trunk.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert not any(isinstance(m, NonLocal) for m in model.modules())


def _cg_ram_by_hand(trunk, branch, images, pids, layer):
    """Eq. 5 at ``layer`` of ``branch`` with its stages called one by one (no feature_map/head)."""
    names = [n for n, _ in branch.stages.named_children()]
    cut = names.index(layer) + 1
    with torch.no_grad():
        fmap = trunk(images)
        for n in names[:cut]:
            fmap = getattr(branch.stages, n)(fmap)

    def head(a):
        for n in names[cut:]:
            a = getattr(branch.stages, n)(a)
        return branch.neck(branch.pool(a))[0]

    return batch_cg_ram(head, fmap, pids)


def test_saliency_maps_explain_the_configured_layer():
    images, pids = _batch()
    model = build_model(ModelConfig(**TINY), 4, EraseConfig(method="besm", layer="layer3")).eval()
    maps = model.saliency_maps(images, pids)
    at3 = _cg_ram_by_hand(model.trunk, model.esb, images, pids, "layer3")
    at4 = _cg_ram_by_hand(model.trunk, model.esb, images, pids, "layer4")
    assert not torch.allclose(at3, at4, atol=1e-6)  # the layer matters
    torch.testing.assert_close(maps, at3)
    # Another branch on request; the trunk's output when the caller gives it (not recomputed
    # from the images, here zeros).
    torch.testing.assert_close(model.saliency_maps(images, pids, "aib"),
                               _cg_ram_by_hand(model.trunk, model.aib, images, pids, "layer3"))
    with torch.no_grad():
        shared = model.trunk(images)
    torch.testing.assert_close(model.saliency_maps(torch.zeros_like(images), pids, shared=shared),
                               at3)


def test_saliency_maps_fall_back_to_the_last_stage_of_a_branch_without_the_layer():
    images, pids = _batch()
    cfg = ModelConfig(**TINY, split="layer4")
    model = build_model(cfg, 4, EraseConfig(method="besm", layer="layer3")).eval()
    torch.testing.assert_close(model.saliency_maps(images, pids),
                               _cg_ram_by_hand(model.trunk, model.esb, images, pids, "layer4"))


def test_forward_train_records_the_erasure_and_draws_from_the_generator():
    cfg = ModelConfig(**TINY)
    model = build_model(cfg, 4, EraseConfig(method="besm", ratio=0.2, prob=0.5)).eval()
    images, pids = _batch()
    runs = []
    for global_seed in (0, 1):  # the global RNG must not matter, only the generator
        torch.manual_seed(global_seed)
        runs.append(model.forward_train(images, pids, torch.Generator().manual_seed(4)))
    a, b = runs
    assert torch.equal(a.was_erased, b.was_erased) and torch.equal(a.erased_images, b.erased_images)
    frac = float(a.was_erased.float().mean())
    zero = float((~_has_contrast(a.saliency)).float().mean())
    assert 0 < frac < 1 and a.info == {"erased_frac": frac, "saliency_nonfinite": 0.0,
                                       "zero_map_frac": zero,
                                       "erased_pixel_frac": frac * round(0.2 * 512) / 512}
    # The saliency maps that drove the erasing (CG-RAM of the ESB at layer4, clean images).
    torch.testing.assert_close(a.saliency, _cg_ram_by_hand(model.trunk, model.esb, images, pids,
                                                           "layer4"))
    with torch.no_grad():
        torch.testing.assert_close(a.branches["aib"].bn_feat, model.aib(model.trunk(images)).bn_feat)
        torch.testing.assert_close(a.branches["esb"].bn_feat,
                                   model.esb(model.trunk(a.erased_images)).bn_feat)


# --- the saliency pass under mixed precision (issue 18) --------------------------------------
#
# A low-precision kernel that returns a non-finite value anywhere in one image's ESB feature
# map used to turn every map of the batch into NaN: the BNNeck in training mode normalises with
# the batch's statistics, so one NaN descriptor entry reaches every descriptor. These tests make
# the low-precision forward produce such values for real, without native bf16 kernels: float16
# autocast on the CPU overflows (its largest value is 65504) where float32 does not.


def _overflowing_in_half(model, factor=1e6):
    """Scale the first convolution of the ESB's layer4: its output overflows float16 (inf, then
    NaN after the BatchNorm) but stays finite in float32, where the BatchNorm normalises it."""
    with torch.no_grad():
        model.esb.stages.layer4[0].conv1.weight.mul_(factor)
    return model


def test_one_non_finite_activation_spreads_to_every_training_map_through_the_bnneck():
    # The mechanism, fed directly: one NaN in one image's feature map, BNNeck in train mode.
    model = _model().train()
    images, pids = _batch()
    with torch.no_grad():
        fmap = model.esb.feature_map(model.trunk(images))
    fmap[3, 7, 0, 0] = float("nan")
    maps = batch_cg_ram(lambda a: model.esb.head(a).bn_feat, fmap, pids)
    assert bool(torch.isnan(maps).all())


@pytest.mark.parametrize("training", [True, False])
def test_saliency_maps_under_half_autocast_are_the_float32_maps_of_the_trunk_output(training):
    model = _overflowing_in_half(_model()).train(training)
    images, pids = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        shared = model.trunk(images)
        assert not bool(torch.isfinite(model.esb.feature_map(shared)).all())  # half overflows
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.float16):
        maps = model.saliency_maps(images, pids, shared=shared)
    assert maps.dtype == torch.float32 and bool(torch.isfinite(maps).all())
    model.load_state_dict(state)  # the same BatchNorm running statistics for the reference
    expected = model.saliency_maps(images, pids, shared=shared.float())
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)
    assert float(maps.amax()) > 0


def test_a_besm_training_forward_under_half_autocast_erases_from_finite_maps():
    model = _overflowing_in_half(_model()).train()
    images, pids = _batch()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model.forward_train(images, pids, torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out.saliency).all()) and bool(out.was_erased.any())
    assert torch.equal(out.was_erased, _has_contrast(out.saliency))
    assert out.info["saliency_nonfinite"] == 0.0


def test_grad_cam_erasing_under_half_autocast_uses_float32_feature_maps():
    model = _overflowing_in_half(_model("gradcam")).train()
    images, pids = _batch()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model.forward_train(images, pids, torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out.saliency).all()) and float(out.saliency.amax()) > 0
