"""Graph capture: grouping into tensor-producing nodes, and no side effects on the model."""

from __future__ import annotations

import torch
from torch import nn

from pipeshift.graph.capture import capture, to_graph


class SizeViewNet(nn.Module):
    """Uses x.size(0) (a non-tensor helper) and BatchNorm (running stats a capture must not touch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y = y + y
        return self.fc(y.view(y.size(0), -1))


def test_capture_leaves_model_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = SizeViewNet().train()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    capture(model, (x,))
    assert torch.equal(torch.rand(3), expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_tensor_helpers_fold_into_their_consumer() -> None:
    x = torch.randn(2, 3, 8, 8)
    cg = capture(SizeViewNet(), (x,))
    g = to_graph(cg)
    view = next(grp for grp in cg.groups if grp.target == "view")
    assert "size" in view.fx_nodes and view.fx_nodes[-1] == view.fx_name
    # Every edge carries a tensor: each node's recorded output has a shape.
    assert all(grp.shapes for grp in cg.groups)
    assert [g[n].desc for n in g.topological_order()][0] == "Input0"
    assert cg.output_ids == [g.sinks()[0]]
    # Activation bytes are the real output's bytes.
    fc = next(grp for grp in cg.groups if grp.target == "fc")
    assert fc.activation_bytes == [2 * 5 * 4]
