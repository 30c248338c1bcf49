"""Pictures + a conversation -> the model's inputs, identical to what transformers' Qwen3-VL processor
gives for the same picture and question (tests/test_preprocessing.py checks token and pixel equality).

Split in two where the process boundary is: preprocessing (CPU, Triton's `preprocess`) decodes and
resizes each picture and sends it as uint8 pixels; the engine (`generate`, on its device) cuts the
patches and normalizes them (`Patchifier.patches`). A 448x448 photo crosses as 602 KB of pixels instead
of 4.8 MB of float32 patches (8x: 1 byte a value instead of 4, and no temporal copy of the frame).
Same torch/torchvision operations as the processor, in a cheaper order, because preprocessing is the
usual bottleneck of VLM serving (shared/notes/anchors.md):
  - resize straight from the decoded HWC buffer (a channels-last view) instead of first copying it to
    CHW: 3x faster on a 12 MP photo;
  - cut patches while still uint8 (1 byte per value), then normalize the contiguous patches: the
    channel axis stays third from last, so `normalize` broadcasts exactly as it does for the image;
  - render the prompt with a single <|image_pad|> and widen it in token space rather than tokenizing
    a string holding hundreds of pad tokens.
Shapes: pixels [sum over pictures of H * W * 3] uint8 (H = grid_h * 16, W = grid_w * 16); pixel_values
[sum over pictures of grid_h * grid_w, 3 * 2 * 16 * 16] float32; input_ids [L] int64.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from shelfsight import params
from shelfsight.conversation import Conversation
from shelfsight.errors import FailedPrecondition, InvalidArgument
from shelfsight.model import checkpoint, imaging, qwen


@dataclass(frozen=True)
class PixelPolicy:
    """How pictures become patches. min/max_pixels bound the resized area (Qwen's smart resize)."""

    min_pixels: int = imaging.PixelBounds.min_pixels
    max_pixels: int = imaging.PixelBounds.max_pixels
    patch_size: int = qwen.PATCH_SIZE
    merge_size: int = qwen.MERGE_SIZE
    temporal_patch_size: int = qwen.TEMPORAL_PATCH_SIZE
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    @classmethod
    def of_model(cls, config) -> "PixelPolicy":
        """The patch geometry of a model's vision_config, with Qwen3-VL's mean and std; where the
        checkpoint directory is at hand, load_policy reads the processor's own."""
        vision = getattr(config, "vision_config", None)
        return cls(patch_size=getattr(vision, "patch_size", qwen.PATCH_SIZE),
                   merge_size=getattr(vision, "spatial_merge_size", qwen.MERGE_SIZE),
                   temporal_patch_size=getattr(vision, "temporal_patch_size", qwen.TEMPORAL_PATCH_SIZE))


@dataclass
class ModelInputs:
    input_ids: np.ndarray  # [L] int64, each picture's pad widened to its visual tokens
    pixels: np.ndarray  # [N] uint8: every picture's resized H x W x 3, in order (0 bytes: none)
    image_grid_thw: np.ndarray  # [n, 3] int64: (1, grid_h, grid_w) per picture
    image_keys: list[str]  # per picture: same key -> same patches
    policy: PixelPolicy = PixelPolicy()

    @property
    def merge_size(self) -> int:
        """Patches per side merged into one visual token."""
        return self.policy.merge_size

    @property
    def image_tokens(self) -> int:
        """Visual tokens of all pictures together."""
        return int(self.image_grid_thw.prod(axis=-1).sum()) // (self.merge_size ** 2)

    @property
    def pixel_values(self) -> np.ndarray:
        """[P, C * T * P * P] float32: the processor's patches, as the engine computes them (on CPU here)."""
        return Patchifier(self.policy).patches(torch.from_numpy(self.pixels),
                                               torch.from_numpy(self.image_grid_thw)).numpy()


class Patchifier:
    """RGB picture -> resized uint8 pixels + grid (`resize`, preprocessing's half) -> pixel_values
    (`patches`, the engine's half, on any device), together exactly as Qwen2VLImageProcessor computes them."""

    def __init__(self, policy: PixelPolicy):
        self.policy = policy
        # The processor folds its 1/255 rescale into mean and std: (x - 127.5) / 127.5 in float32.
        self._mean = torch.tensor(policy.image_mean) * 255.0
        self._std = torch.tensor(policy.image_std) * 255.0
        self._devices: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on `device`, copied there once."""
        key = str(device)
        if key not in self._devices:
            self._devices[key] = (self._mean.to(device), self._std.to(device))
        return self._devices[key]

    @property
    def patch_dim(self) -> int:
        return 3 * self.policy.temporal_patch_size * self.policy.patch_size ** 2

    def picture_bytes(self, grid) -> int:
        """Bytes of one picture's pixels for its grid (1, gh, gw)."""
        return int(grid[1]) * int(grid[2]) * self.policy.patch_size ** 2 * 3

    def __call__(self, rgb) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Both halves at once: -> (pixel_values [gh * gw, D] float32, grid)."""
        hwc, grid = self.resize(rgb)
        return self.patches(hwc.reshape(-1), torch.tensor([grid])), grid

    def resize(self, rgb) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """RGB picture -> (its pixels resized to the grid, [H, W, 3] uint8 (may be a strided view), grid)."""
        pol = self.policy
        with warnings.catch_warnings():  # Pillow's buffer is read-only; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            hwc = torch.from_numpy(np.asarray(rgb))  # [H, W, 3] uint8
        h, w = hwc.shape[:2]
        H, W = pol.target_size(h, w)
        if (H, W) != (h, w):
            chw = hwc.permute(2, 0, 1)
            if H * W > h * w:  # upscaling reads each source pixel many times: contiguous is faster
                chw = chw.contiguous()
            chw = tvF.resize(chw[None], [H, W], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)[0]
            hwc = chw.permute(1, 2, 0)
        return hwc, (1, H // pol.patch_size, W // pol.patch_size)

    def patches(self, pixels: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """pixels [N] uint8 (pictures' H x W x 3, in order), grids [n, 3] -> pixel_values [P, D] float32
        on pixels' device: the processor's operations, subtraction and division, which IEEE float32
        rounds exactly on any device (bit-for-bit equality is tested on CPU)."""
        pol = self.policy
        P, M, T = pol.patch_size, pol.merge_size, pol.temporal_patch_size
        shapes = grids.reshape(-1, 3).tolist()
        need = sum(self.picture_bytes(g) for g in shapes)
        if need != pixels.numel():
            raise InvalidArgument(f"pixels hold {pixels.numel()} bytes; the grids {shapes} need {need}")
        out, at = [], 0
        mean, std = self._on(pixels.device)
        for _, gh, gw in shapes:
            n = gh * gw * P * P * 3
            hwc = pixels[at:at + n]
            at += n
            # [gh/M, M, P, gw/M, M, P, C] -> [gh/M, gw/M, M, M, C, P, P]: the processor's patch order
            u8 = hwc.reshape(gh // M, M, P, gw // M, M, P, 3).permute(0, 3, 1, 4, 6, 2, 5).contiguous()
            patches = tvF.normalize(u8.to(torch.float32), mean, std, inplace=True)
            k = gh * gw
            # a still picture is its own second frame: repeat along the temporal patch axis
            out.append(patches.reshape(k, 3, 1, P, P).expand(k, 3, T, P, P).reshape(k, 3 * T * P * P))
        if not out:
            return torch.zeros((0, self.patch_dim), dtype=torch.float32, device=pixels.device)
        return torch.cat(out) if len(out) > 1 else out[0]


class PromptBuilder:
    """Chat messages -> input_ids, rendered with the checkpoint's own chat template, each picture's
    single <|image_pad|> widened to that picture's visual tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, messages: list[dict], image_tokens: list[int]) -> np.ndarray:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        pads = np.flatnonzero(ids == qwen.IMAGE_PAD_ID)
        if len(pads) != len(image_tokens):  # the template must place exactly one pad per picture
            raise InvalidArgument(f"prompt holds {len(pads)} image placeholders for {len(image_tokens)} pictures")
        pieces, at = [], 0
        for pad, n in zip(pads, image_tokens):
            pieces += [ids[at:pad], np.full(n, qwen.IMAGE_PAD_ID, np.int64)]
            at = int(pad) + 1
        pieces.append(ids[at:])
        return np.concatenate(pieces)


@dataclass(frozen=True)
class Pictures:
    """Pictures as the model takes them: pixels of all of them, their grids, their keys."""
    pixels: np.ndarray  # [N] uint8
    grids: np.ndarray  # [n, 3] int64
    keys: list[str]
    tokens: list[int]  # visual tokens per picture


class Preprocessor:
    """The preprocess step: validation, decoding, patches and prompt for one request.

    `__call__` is the classic request (one picture, one question, an optional system prompt);
    `converse` takes a Conversation and its pictures; `render` takes chat messages already built
    (the embedding and reranking formats, shelfsight/model/retrieval.py)."""

    def __init__(self, tokenizer, policy: PixelPolicy, image_limits: imaging.ImageLimits,
                 text_limits: params.Limits):
        self.patchify = Patchifier(policy)
        self.prompt = PromptBuilder(tokenizer)
        self.tokenizer = tokenizer
        self.image_limits = image_limits
        self.text_limits = text_limits

    def __call__(self, image: bytes, question: str, system: str | None = None,
                 enhance: bool = False) -> ModelInputs:
        params.check_text("question", question, self.text_limits.max_question_chars, required=True)
        if system:
            params.check_text("system", system, self.text_limits.max_system_chars, required=False)
        return self.render(Conversation.ask(question, system).messages(), [image], enhance)

    def converse(self, pictures: list[bytes], conversation: Conversation, enhance: bool = False) -> ModelInputs:
        conversation.check(self.text_limits)
        if conversation.pictures != len(pictures):
            raise InvalidArgument(f"messages place {conversation.pictures} pictures; {len(pictures)} were sent")
        return self.render(conversation.messages(), pictures, enhance)

    def pictures(self, images: list[bytes], enhance: bool = False) -> Pictures:
        """Decode and resize each picture (an error names which one when there are several)."""
        values, grids, keys, tokens = [], [], [], []
        merge = self.patchify.policy.merge_size
        for i, image in enumerate(images):
            try:
                rgb = imaging.decode(image, self.image_limits, enhance=enhance)
            except InvalidArgument as e:
                raise InvalidArgument(f"picture {i + 1} of {len(images)}: {e.message}" if len(images) > 1
                                      else e.message) from None
            hwc, grid = self.patchify.resize(rgb)
            values.append(hwc.numpy().reshape(-1))  # a copy only where resize left a strided view
            grids.append(grid)
            tokens.append(grid[0] * grid[1] * grid[2] // merge ** 2)
            key = hashlib.blake2b(image, digest_size=16, person=b"enh" if enhance else b"raw")
            key.update(repr(self.patchify.policy).encode())
            keys.append(key.hexdigest())
        pixels = np.concatenate(values) if values else np.zeros(0, np.uint8)
        return Pictures(pixels, np.asarray(grids, dtype=np.int64).reshape(-1, 3), keys, tokens)

    def render(self, messages: list[dict], images: list[bytes], enhance: bool = False) -> ModelInputs:
        pics = self.pictures(images, enhance)
        return ModelInputs(input_ids=self.prompt(messages, pics.tokens), pixels=pics.pixels,
                           image_grid_thw=pics.grids, image_keys=pics.keys, policy=self.patchify.policy)


def load_preprocessor(checkpoint_dir, min_pixels: int, max_pixels: int,
                      image_limits: imaging.ImageLimits, text_limits: params.Limits) -> Preprocessor:
    """A Preprocessor using the checkpoint's tokenizer, chat template and image-processor constants."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(checkpoint_dir)
    policy = _policy(checkpoint_dir, proc.image_processor, min_pixels, max_pixels)
    return Preprocessor(proc.tokenizer, policy, image_limits, text_limits)


def load_policy(checkpoint_dir, min_pixels: int = PixelPolicy.min_pixels,
                max_pixels: int = PixelPolicy.max_pixels) -> PixelPolicy:
    """The checkpoint's PixelPolicy alone (the engine's half: patch geometry, mean and std)."""
    from transformers import AutoImageProcessor

    return _policy(checkpoint_dir, AutoImageProcessor.from_pretrained(checkpoint_dir), min_pixels, max_pixels)


def _policy(checkpoint_dir, ip, min_pixels: int, max_pixels: int) -> PixelPolicy:
    """The processor's patch geometry must be the vision tower's (config.json's vision_config): patches
    cut or merged differently from how the model merges them would give wrong answers, not errors."""
    vision = checkpoint.inspect(checkpoint_dir).config.get("vision_config", {})
    for ours, theirs, default in (("merge_size", "spatial_merge_size", qwen.MERGE_SIZE),
                                  ("patch_size", "patch_size", qwen.PATCH_SIZE),
                                  ("temporal_patch_size", "temporal_patch_size", qwen.TEMPORAL_PATCH_SIZE)):
        if getattr(ip, ours) != vision.get(theirs, default):
            raise FailedPrecondition(f"{checkpoint_dir}: the image processor's {ours} is {getattr(ip, ours)}, "
                                     f"the vision tower's {theirs} is {vision.get(theirs, default)}")
    return PixelPolicy(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=ip.patch_size,
                       merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size,
                       image_mean=tuple(ip.image_mean), image_std=tuple(ip.image_std))
