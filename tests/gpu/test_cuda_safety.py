"""The safety checker on CUDA in half precision (skipped without a GPU): the flags it
gives on the CPU in float32."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from tests.safety import save_checker, tinted_noise


def test_the_checker_flags_in_float16_on_the_gpu_as_in_float32_on_the_cpu(tmp_path):
    from deployments.safety import SafetyChecker

    red, blue = (220, 30, 30), (30, 30, 220)
    save_checker(tmp_path, [tinted_noise(s, red) for s in range(3)],
                 [tinted_noise(s, blue) for s in range(3)])
    images = [tinted_noise(10, red), tinted_noise(11, blue), tinted_noise(12, blue), tinted_noise(13, red)]
    gpu = SafetyChecker(tmp_path, torch.device("cuda"), torch.float16)
    assert next(gpu.model.parameters()).dtype == torch.float16
    assert gpu.flags(images) == SafetyChecker(tmp_path, torch.device("cpu"),
                                              torch.float32).flags(images)
    assert gpu.flags(images) == [True, False, False, True]
