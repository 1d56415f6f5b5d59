"""The model zoo: tiny versions train, capture as DAGs, match torchvision's layout, and their data is sound.

References are independent of our code: torchvision's published parameter counts and state_dict
naming, GPT-2 small's parameter count, and values computed in the test itself.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import capture, to_graph
from pipeshift.models import ZOO, data
from pipeshift.spec import ModelBundle, ModelSpec, parse_model_args

torch.set_num_threads(1)

# Tiny sizes: each model runs forward + backward in well under a second on one core.
TINY: dict[str, dict] = {
    "alexnet": dict(width=8, hidden=32, num_classes=10, image_size=63),
    "vgg16": dict(width=4, hidden=32, num_classes=10, image_size=32),
    "resnet18": dict(width=4, num_classes=10, image_size=32),
    "resnet50": dict(width=4, num_classes=10, image_size=32),
    "resnet152": dict(width=2, num_classes=10, image_size=16),
    "inception_v3": dict(width=4, num_classes=10, image_size=75),
    "gnmt": dict(width=16, depth=3, vocab_size=40, seq_len=6),
    "gpt": dict(width=16, depth=2, heads=2, vocab_size=40, block_size=16, seq_len=8),
    "mlp": dict(width=16, depth=3),
}
REAL_DATA = {
    "alexnet": "digits", "vgg16": "digits", "resnet18": "digits", "resnet50": "digits", "resnet152": "digits",
    "inception_v3": "digits", "mlp": "digits", "gnmt": "text", "gpt": "text",
}
SEQUENCE_MODELS = {"gnmt", "gpt"}


def tiny(name: str, **overrides) -> ModelBundle:
    torch.manual_seed(0)
    return ZOO[name](**{**TINY[name], **overrides})


def n_classes(name: str, bundle: ModelBundle) -> int:
    """Upper bound (exclusive) of target values, read from the model's output layer."""
    head = {"gnmt": "decoder.classifier", "gpt": "lm_head", "mlp": "layers.4", "alexnet": "classifier.6",
            "vgg16": "classifier.6"}.get(name, "fc")
    return bundle.model.get_submodule(head).out_features


def test_zoo_lists_every_model():
    assert set(ZOO) == {"vgg16", "alexnet", "resnet18", "resnet50", "resnet152", "inception_v3", "gnmt", "gpt", "mlp"}
    assert set(TINY) == set(ZOO)


# -- forward and backward ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_at_tiny_size(name):
    bundle = tiny(name)
    inputs, target = bundle.example_inputs(2), bundle.example_target(2)
    out = bundle.model(*inputs)
    if name in SEQUENCE_MODELS:
        assert out.shape == (*target.shape, n_classes(name, bundle))
        assert all(t.dtype == torch.int64 for t in inputs)
    else:
        assert out.shape == (2, n_classes(name, bundle))
    loss = bundle.criterion()(out, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in bundle.model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in bundle.model.parameters())


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_is_deterministic(name):
    bundle = tiny(name)
    inputs = bundle.example_inputs(3)
    assert all(torch.equal(a, b) for a, b in zip(inputs, bundle.example_inputs(3)))
    with torch.no_grad():
        first, second = bundle.model(*inputs), bundle.model(*inputs)
    assert torch.equal(first, second)


# -- capture -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_capture_gives_a_dag_computing_the_model(name):
    bundle = tiny(name)
    inputs = bundle.example_inputs(2)
    captured = capture(bundle.model, inputs)
    graph = to_graph(captured)
    assert graph.find_cycle() is None
    assert sorted(graph.topological_order()) == sorted(graph.nodes)
    assert len([g for g in captured.groups if g.op == "placeholder"]) == len(inputs)
    assert len(captured.output_ids) == 1
    modules = dict(bundle.model.named_modules())
    assert all(g.target in modules for g in captured.groups if g.op == "call_module")
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(*inputs), bundle.model(*inputs), rtol=0, atol=0)


def test_inception_graph_is_branchy():
    bundle = tiny("inception_v3")
    captured = capture(bundle.model, bundle.example_inputs(2))
    graph = to_graph(captured)
    fan_out = {n: len(graph.successors(n)) for n in graph.nodes}
    fan_in = {n: len(graph.predecessors(n)) for n in graph.nodes}
    assert sum(1 for k in fan_out.values() if k > 1) >= 11  # every Mixed block's input, at least
    assert max(fan_out.values()) >= 4  # InceptionA/C/E: three convs and a pool read the same input
    cats = [g.node_id for g in captured.groups if g.target == "cat"]
    assert len(cats) >= 11 and max(fan_in[c] for c in cats) == 4
    # A branch of Mixed_5b reads the stem's output directly, not through another branch.
    by_id = captured.by_id()
    stem = next(g.node_id for g in captured.groups if g.target == "maxpool2")
    readers = {by_id[s].target for s in graph.successors(stem)}
    assert {"Mixed_5b.branch1x1.conv", "Mixed_5b.branch5x5_1.conv", "Mixed_5b.branch3x3dbl_1.conv"} <= readers


def test_inception_aux_logits_in_training_is_a_tuple_of_tensors():
    bundle = tiny("inception_v3", aux_logits=True, width=2, image_size=299)
    inputs, target = bundle.example_inputs(2), bundle.example_target(2)
    logits, aux = bundle.model(*inputs)
    assert logits.shape == aux.shape == (2, 10)
    criterion = bundle.criterion()
    ce = nn.CrossEntropyLoss()
    torch.testing.assert_close(criterion((logits, aux), target), ce(logits, target) + 0.4 * ce(aux, target))
    assert len(capture(bundle.model, inputs).output_ids) == 2
    bundle.model.eval()
    assert torch.is_tensor(bundle.model(*inputs))


def test_inception_transform_input_traces():
    bundle = tiny("inception_v3", transform_input=True)
    inputs = bundle.example_inputs(2)
    captured = capture(bundle.model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(*inputs), bundle.model(*inputs), rtol=0, atol=0)


# -- torchvision layout ------------------------------------------------------------------


def on_meta(name: str, **kwargs) -> nn.Module:
    """The default-size model without allocating its weights."""
    with torch.device("meta"):
        return ZOO[name](**kwargs).model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# torchvision's documented parameter counts (torchvision.models docs, "Params" column).
@pytest.mark.parametrize(
    "name, kwargs, params",
    [
        ("alexnet", {}, 61_100_840),
        ("vgg16", {}, 138_357_544),
        ("vgg16", {"batch_norm": True}, 138_365_992),
        ("resnet18", {}, 11_689_512),
        ("resnet50", {}, 25_557_032),
        ("resnet152", {}, 60_192_808),
        ("inception_v3", {"aux_logits": True}, 27_161_264),
        ("gpt", {"tie_weights": True}, 124_439_808),  # GPT-2 small
    ],
)
def test_default_size_parameter_counts_match_the_published_models(name, kwargs, params):
    assert n_params(on_meta(name, **kwargs)) == params


def _expand(modules: list[str]) -> list[str]:
    """state_dict keys of conv (no bias), BatchNorm and Linear modules, in order."""
    keys: list[str] = []
    for m in modules:
        if m.endswith("fc"):
            keys += [f"{m}.weight", f"{m}.bias"]
        elif ".bn" in f".{m}" or m.endswith("downsample.1"):
            keys += [f"{m}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        else:
            keys.append(f"{m}.weight")
    return keys


RESNET18_MODULES = ["conv1", "bn1"] + [
    f"layer{stage}.{block}.{m}"
    for stage in (1, 2, 3, 4)
    for block in (0, 1)
    for m in ["conv1", "bn1", "conv2", "bn2"] + (["downsample.0", "downsample.1"] if stage > 1 and block == 0 else [])
] + ["fc"]


def test_resnet18_state_dict_keys_are_torchvisions():
    state = on_meta("resnet18").state_dict()
    assert len(state) == 122
    assert list(state) == _expand(RESNET18_MODULES)
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
              "layer4.1.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 512), "fc.bias": (1000,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    # the knob changes shapes, never names
    assert list(tiny("resnet18").model.state_dict()) == list(state)


@pytest.mark.parametrize(
    "name, kwargs, count, shapes",
    [
        ("resnet50", {}, 320, {"layer1.0.conv3.weight": (256, 64, 1, 1), "layer3.5.bn3.running_var": (1024,),
                               "layer4.0.downsample.0.weight": (2048, 1024, 1, 1), "fc.weight": (1000, 2048)}),
        ("resnet152", {}, 932, {"layer3.35.conv2.weight": (256, 256, 3, 3), "layer2.7.bn1.weight": (128,)}),
        ("vgg16", {}, 32, {"features.0.weight": (64, 3, 3, 3), "features.28.weight": (512, 512, 3, 3),
                          "classifier.0.weight": (4096, 25088), "classifier.3.weight": (4096, 4096),
                          "classifier.6.bias": (1000,)}),
        ("alexnet", {}, 16, {"features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
                            "features.6.weight": (384, 192, 3, 3), "features.8.weight": (256, 384, 3, 3),
                            "features.10.weight": (256, 256, 3, 3), "classifier.1.weight": (4096, 9216),
                            "classifier.4.weight": (4096, 4096), "classifier.6.weight": (1000, 4096)}),
        # 94 BasicConv2d (conv weight + 5 BatchNorm entries) + fc; the aux head adds 2 convs and a linear
        ("inception_v3", {}, 94 * 6 + 2, {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
                                          "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                                          "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                                          "Mixed_7c.branch3x3dbl_3b.bn.running_mean": (384,),
                                          "fc.weight": (1000, 2048)}),
        ("inception_v3", {"aux_logits": True}, 96 * 6 + 4, {"AuxLogits.conv0.conv.weight": (128, 768, 1, 1),
                                                            "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
                                                            "AuxLogits.fc.weight": (1000, 768)}),
    ],
)
def test_state_dict_names_and_shapes_are_torchvisions(name, kwargs, count, shapes):
    state = on_meta(name, **kwargs).state_dict()
    assert len(state) == count
    assert {k: tuple(state[k].shape) for k in shapes if k in state} == shapes
    small = {**TINY[name], **kwargs, **({"image_size": 299} if kwargs.get("aux_logits") else {})}
    assert list(ZOO[name](**small).model.state_dict()) == list(state)


def test_inception_aux_keys_sit_between_mixed_6e_and_7a():
    keys = list(on_meta("inception_v3", aux_logits=True).state_dict())
    aux = [i for i, k in enumerate(keys) if k.startswith("AuxLogits.")]
    assert keys[aux[0] - 1].startswith("Mixed_6e.") and keys[aux[-1] + 1].startswith("Mixed_7a.")


def test_gpt_tied_head_shares_the_embedding():
    model = tiny("gpt", tie_weights=True).model
    assert model.lm_head.weight is model.wte.weight
    spec = ModelSpec(callable="pipeshift.models:gpt", kwargs={**TINY["gpt"], **parse_model_args(["tie_weights=false"])})
    from_cli = spec.build().model
    assert from_cli.lm_head.weight is not from_cli.wte.weight
    untied = tiny("gpt").model
    assert untied.lm_head.weight is not untied.wte.weight


# -- specs -------------------------------------------------------------------------------


def test_zoo_builds_through_a_model_spec():
    kwargs = parse_model_args(["width=16", "num_classes=10", "image_size=32", "data=digits"])
    spec = ModelSpec(callable="pipeshift.models:resnet50", kwargs=kwargs, seed=3)
    first, second = spec.build(), spec.build()
    assert first.model.fc.in_features == 16 * 8 * 4
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    (images,), labels = next(first.data(4))
    assert images.shape == (4, 3, 32, 32) and labels.max() < 10
    other = ModelSpec(callable="pipeshift.models:resnet50", kwargs=kwargs, seed=4).build()
    assert not torch.equal(other.model.conv1.weight, first.model.conv1.weight)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("resnet50", {"width": 0}, "width=0"),
        ("vgg16", {"image_size": 16}, "image_size >= 32"),
        ("inception_v3", {"image_size": 64}, "image_size >= 75"),
        ("inception_v3", {"aux_logits": True, "image_size": 298}, "image_size >= 299"),
        ("resnet18", {"data": "imagenet"}, "data='imagenet'"),
        ("resnet18", {"num_classes": 5, "data": "digits"}, "10 classes"),
        ("gpt", {"width": 10, "heads": 3}, "multiple of heads"),
        ("gpt", {"block_size": 8, "seq_len": 9}, "exceeds block_size"),
        ("gpt", {"vocab_size": 20, "data": "text"}, "vocab_size >= 98"),
        ("gnmt", {"depth": 1}, "depth=1"),
        ("mlp", {"in_features": 10, "data": "digits"}, "64 features"),
        ("alexnet", {"dropout": 1.5}, "dropout=1.5"),
        ("gpt", {"tie_weights": "maybe"}, "tie_weights='maybe'"),
    ],
)
def test_bad_knobs_are_user_errors(name, kwargs, message):
    with pytest.raises(PipeshiftError, match=message.replace("(", r"\(")):
        ZOO[name](**{**TINY[name], **kwargs})


def test_unknown_knob_is_a_user_error_through_the_spec():
    with pytest.raises(PipeshiftError, match="depthh"):
        ModelSpec(callable="pipeshift.models:mlp", kwargs={"depthh": 2}).build()


def test_unknown_split_is_a_user_error():
    with pytest.raises(PipeshiftError, match="split 'test'"):
        next(tiny("mlp").data(4, "test"))


# -- data --------------------------------------------------------------------------------


def take(it, n):
    return list(itertools.islice(it, n))


def same_batches(a, b) -> bool:
    return all(
        len(x[0]) == len(y[0]) and all(torch.equal(p, q) for p, q in zip(x[0], y[0])) and torch.equal(x[1], y[1])
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("name, source", [(n, d) for n in sorted(TINY) for d in ("synthetic", REAL_DATA[n])])
def test_data_is_deterministic_per_seed_and_in_range(name, source):
    kwargs = {"vocab_size": None} if source == "text" else {}
    bundle = tiny(name, data=source, **kwargs)
    runs = [take(bundle.data(4, "train", seed=7), 3) for _ in range(2)]
    assert same_batches(*runs)
    assert not same_batches(runs[0], take(bundle.data(4, "train", seed=8), 3))
    assert not same_batches(runs[0], take(bundle.data(4, "val", seed=7), 3))
    examples = bundle.example_inputs(4)
    bound = n_classes(name, bundle)
    for inputs, target in runs[0]:
        assert [(t.shape, t.dtype) for t in inputs] == [(t.shape, t.dtype) for t in examples]
        assert target.shape == bundle.example_target(4).shape and target.dtype == torch.int64
        assert 0 <= int(target.min()) and int(target.max()) < bound
        if inputs[0].dtype == torch.int64:
            assert all(0 <= int(t.min()) and int(t.max()) < bound for t in inputs)
    with torch.no_grad():
        out = bundle.model(*runs[0][0][0])
    assert torch.isfinite(bundle.criterion()(out, runs[0][0][1]))


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    raw = load_digits()
    raw_samples = Counter((tuple(int(v) for v in img), int(y)) for img, y in zip(raw.data, raw.target))
    train_x, train_y = data.digits_split("train")
    val_x, val_y = data.digits_split("val")
    assert len(train_y) + len(val_y) == 1797 and len(val_y) == 1797 // 5
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-4
    # Standardisation is affine and the training split holds both extreme pixel values (0 and 16):
    # undo it and find every raw sample exactly once across the two splits.
    lo, hi = train_x.min(), train_x.max()
    restored: Counter = Counter()
    for x, y in ((train_x, train_y), (val_x, val_y)):
        pixels = ((x.flatten(1) - lo) / (hi - lo) * 16).round().int()
        restored.update((tuple(row), label) for row, label in zip(pixels.tolist(), y.tolist()))
    assert restored == raw_samples


def test_digit_images_are_the_digits_upsampled():
    bundle = tiny("resnet18", data="digits", image_size=16)
    (images,), labels = next(bundle.data(8, "val", seed=0))
    assert images.shape == (8, 3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 2])
    # Downsampling the 16x16 image back by 2x2 averaging roughly recovers the 8x8 digit.
    val_x, val_y = data.digits_split("val")
    small = torch.nn.functional.avg_pool2d(images[:, :1], 2)
    nearest = torch.cdist(small.flatten(1), val_x.flatten(1)).argmin(dim=1)
    assert torch.equal(val_y[nearest], labels)


def test_text_corpus_is_english_and_round_trips():
    corpus = data.text_corpus()
    assert len(corpus) > 20_000
    for word in ("dataset", "samples", "attributes", "the"):
        assert word in corpus
    ids = data.encode_text(corpus)
    assert int(ids.max()) < data.TEXT_VOCAB_SIZE and int(ids.min()) >= 0
    ascii_only = "".join(c for c in corpus if c in data.TEXT_VOCAB)
    assert data.decode_text(data.encode_text(ascii_only)) == ascii_only
    train, val = data.text_split("train"), data.text_split("val")
    assert torch.equal(torch.cat([train, val]), ids) and len(val) * 8 < len(train)


def test_gpt_text_batches_are_next_character_prediction():
    bundle = tiny("gpt", data="text", vocab_size=None)
    (tokens,), target = next(bundle.data(4, "train", seed=1))
    assert tokens.shape == target.shape == (4, 8)
    assert torch.equal(tokens[:, 1:], target[:, :-1])
    text = data.decode_text(torch.cat([tokens[0], target[0, -1:]]))
    assert text in data.text_corpus()[: len(data.text_split("train"))]


def test_gnmt_text_batches_are_reversal():
    bundle = tiny("gnmt", data="text", vocab_size=None)
    (source, target_in), target = next(bundle.data(4, "val", seed=1))
    assert source.shape == target_in.shape == target.shape == (4, 6)
    assert torch.equal(target, source.flip(1))
    assert (target_in[:, 0] == data.BOS).all() and torch.equal(target_in[:, 1:], target[:, :-1])
    assert data.decode_text(source[0]) in data.text_corpus()[-len(data.text_split("val")):]


# -- convergence on the real data --------------------------------------------------------


def mean_val_loss(bundle: ModelBundle, criterion: nn.Module, batches: int = 4) -> float:
    bundle.model.eval()
    with torch.no_grad():
        losses = [criterion(bundle.model(*x), y).item() for x, y in take(bundle.data(64, "val", seed=0), batches)]
    bundle.model.train()
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "name, kwargs, steps, factor",
    [
        ("mlp", dict(width=32, depth=3, data="digits"), 40, 0.3),
        ("gpt", dict(width=32, depth=2, heads=2, block_size=32, seq_len=32, vocab_size=None, data="text"), 40, 0.8),
        ("gnmt", dict(width=32, depth=2, seq_len=8, vocab_size=None, data="text"), 50, 0.8),
    ],
)
def test_training_on_real_data_reduces_validation_loss(name, kwargs, steps, factor):
    bundle = tiny(name, **kwargs)
    criterion = bundle.criterion()
    before = mean_val_loss(bundle, criterion)
    optimizer = torch.optim.Adam(bundle.model.parameters(), lr=1e-2)
    for inputs, target in take(bundle.data(32, "train", seed=0), steps):
        optimizer.zero_grad()
        criterion(bundle.model(*inputs), target).backward()
        optimizer.step()
    after = mean_val_loss(bundle, criterion)
    assert after < factor * before, f"{name}: validation loss {before:.3f} -> {after:.3f}"
