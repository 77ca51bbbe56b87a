"""The image safety checker: loaded as Stable Diffusion's is, it flags what its concepts
describe; results without their flagged images."""

import pytest

from serve.errors import ContentFlagged
from serve.types import BatchInfo, GenerationResult
from tests.safety import save_checker, tinted_noise


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    import torch

    from deployments.safety import SafetyChecker

    folder = tmp_path_factory.mktemp("checker")
    save_checker(folder, [tinted_noise(s, (220, 30, 30)) for s in range(3)],
                 [tinted_noise(s, (30, 30, 220)) for s in range(3)])
    return SafetyChecker(folder, torch.device("cpu"), torch.float32)


def test_the_checker_flags_images_like_its_concepts_and_passes_others(checker):
    red, blue = (220, 30, 30), (30, 30, 220)
    # Seeds 10-13 were not among the images its concepts were made from.
    assert checker.flags([tinted_noise(10, red), tinted_noise(11, blue), tinted_noise(12, blue),
                          tinted_noise(13, red)]) == [True, False, False, True]
    assert checker.flags([]) == []


def test_the_checker_loads_from_the_folder_as_saved(checker):
    import torch

    assert checker.model.concept_embeds_weights.dtype == torch.float32
    assert torch.all(checker.model.special_care_embeds_weights == 2.0)
    assert checker.processor.crop_size == {"height": 32, "width": 32}


def _result(nsfw):
    n = len(nsfw) or 3
    return GenerationResult(images=[bytes([i]) for i in range(n)], seeds=[7 + i for i in range(n)],
                            media_type="image/png", width=64, height=64,
                            batch=BatchInfo("b", n, 1, 0, 0), replica="r", nsfw=tuple(nsfw))


def test_a_result_without_its_flagged_images_keeps_the_others_seeds():
    kept = _result((True, False, True)).unflagged()
    assert kept.images == [b"\x01"] and kept.seeds == [8] and kept.nsfw == (False,)
    unchecked = _result(())
    assert unchecked.unflagged() is unchecked
    with pytest.raises(ContentFlagged, match="NSFW content detected. Try running it again"):
        _result((True, True)).unflagged()
