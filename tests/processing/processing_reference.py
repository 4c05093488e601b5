"""Helpers shared by the processor tests: the reference processors (transformers 5.23, PIL backend) and comparisons."""

import json

import torch

from tiny import V1_FILES, V2_FILES

FOLDERS = {"v1": V1_FILES, "v2": V2_FILES}


def reference_processor(family: str):
    """v1 loads with AutoProcessor; v2's AutoProcessor needs a torchvision video processor, so it is built from its
    parts with a stand-in video processor (only its num_frames/fps are read, by apply_chat_template)."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    folder = FOLDERS[family]
    if family == "v1":
        return AutoProcessor.from_pretrained(folder, backend="pil")

    class StandInVideoProcessor:
        num_frames, fps = 64, 1

    class ReferenceSmolVLMProcessor(SmolVLMProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None  # the stand-in video processor is not a transformers BaseVideoProcessor

    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    image_processor, tokenizer = SmolVLMImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return ReferenceSmolVLMProcessor(image_processor, tokenizer, StandInVideoProcessor(), image_seq_len=seq_len,
                                     chat_template=template)



def assert_same_inputs(ours: dict, ref) -> None:
    """Same keys, dtypes, shapes and bit-identical values."""
    assert sorted(ours) == sorted(ref.keys())
    for key in ref.keys():
        expected = ref[key] if isinstance(ref[key], torch.Tensor) else torch.as_tensor(ref[key])
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        assert torch.equal(ours[key], expected), key


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A photo-like PIL image: smooth colour fields (a small random image scaled up) with pixel noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    image = Image.fromarray(np.asarray(base) ^ rng.integers(0, 32, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)
