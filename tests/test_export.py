"""ONNX export: parity with torch at several batch sizes, and refusal of a copy that disagrees."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.models import build_model
from tmu_core.serving.export import INPUT_NAME, OUTPUT_NAME, export_onnx, sha256_file

META = {"in_channels": 3, "image_size": 16}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", 4, 3, 16, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)).eval()


class DriftingModel(nn.Module):
    """Adds a call counter to its output: the traced graph freezes the count, so torch and ONNX disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 16 * 16, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(x.flatten(1)) + float(self.calls)


def test_export_matches_torch_with_a_dynamic_batch(tmp_path):
    model = _model()
    check = export_onnx(model, META, tmp_path / "m.onnx", batch=4)
    assert check.path == tmp_path / "m.onnx" and check.path.is_file()
    assert 0.0 <= check.max_abs_diff <= 1e-4
    assert check.batch_sizes == (4, 1) and check.opset == 17
    assert check.sha256 == sha256_file(check.path)
    session = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    images = torch.rand((7, 3, 16, 16), generator=generator(5))
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    with torch.inference_mode():
        expected = model(images)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-5)


def test_float32_rounding_of_large_logits_is_accepted(tmp_path):
    """Weights of a realistic scale give logits in the hundreds; their rounding passes 1e-4 but not 1e-3 of them."""
    model = _model()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(1000 ** 0.25)
    check = export_onnx(model, META, tmp_path / "m.onnx")
    assert check.max_abs_diff > 1e-4  # an absolute 1e-4 would refuse this correct copy
    assert check.max_abs_diff <= check.tolerance and 1e-4 < check.tolerance < 10


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, META, tmp_path / "m.onnx")
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_copy_that_disagrees_is_refused_and_no_file_is_left(tmp_path):
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(CheckpointError, match=r"disagrees with torch: max abs diff .* > .* \(the larger of 0.0001 "
                                              r"and 0.001 x the largest logit"):
        export_onnx(DriftingModel(), META, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_refusal_keeps_an_existing_good_file(tmp_path):
    target = tmp_path / "m.onnx"
    export_onnx(_model(), META, target)
    digest = sha256_file(target)
    with pytest.raises(CheckpointError):
        export_onnx(DriftingModel(), META, target)
    assert sha256_file(target) == digest


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_model_that_cannot_be_exported_is_a_checkpoint_error(tmp_path):
    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": x.sum().item()}

    with pytest.raises(CheckpointError, match="ONNX export failed"):
        export_onnx(Untraceable(), META, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments_say_what_is_accepted(tmp_path):
    with pytest.raises(InvalidInputError, match="batch must be >= 1, got 0"):
        export_onnx(_model(), META, tmp_path / "m.onnx", batch=0)
    with pytest.raises(InvalidInputError, match="lacks 'image_size'"):
        export_onnx(_model(), {"in_channels": 3}, tmp_path / "m.onnx")
