"""High-resolution image preprocessing: pad-to-square (LLaVA-1.5) and AnyRes tiling (LLaVA-NeXT).

``image.mode`` of the model config picks the preprocessing (docs/high_resolution.md):

- ``crop``: timm's eval transform (:func:`~owl_lightning.models.vision.image_transform`), uint8 ``[3, S, S]``.
- ``pad``: the whole image, its longer side resized to ``S``, centred on an ``S × S`` square of the
  encoder's normalisation mean (so padding normalises to zero), uint8 ``[3, S, S]``.
- ``anyres``: a :class:`TiledImage`: the padded global view, then the tiles of the image resized and
  padded to the best ``rows·S × cols·S`` grid of ``image.tile_grids`` (:func:`select_best_grid`).

``S`` is the vision encoder's input side (``vision.image_size`` or timm's default for the model).
Resizing runs on uint8 tensors with torchvision's antialiased kernels, as the crop transform does.

A preprocessed media item is one of three: a still's uint8 ``[3, S, S]``, a :class:`TiledImage`, or a
:class:`~owl_lightning.data.video.VideoClip` (its frames, each one view: :func:`frame_preprocess`).
:func:`image_views`, :func:`image_grid`, :func:`image_frames` and :func:`visual_tokens_of` take any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision.transforms.v2 import functional as TF

from owl_lightning.config import OwlConfig, VisionConfig, visual_tokens_of_grid
from owl_lightning.data.video import VideoClip
from owl_lightning.models.owl import visual_tokens_per_image
from owl_lightning.models.vision import image_transform, vision_data_config


@dataclass(frozen=True)
class TiledImage:
    """One AnyRes image: ``views`` uint8 ``[1 + rows·cols, 3, S, S]``, the global view first, then the
    tiles row-major (left to right, top to bottom)."""

    views: torch.Tensor
    rows: int
    cols: int


Media = torch.Tensor | TiledImage | VideoClip  # a preprocessed image or clip, as EncodedSample holds it


def image_views(image: Media) -> torch.Tensor:
    """A preprocessed item's views for the encoder: uint8 ``[1, 3, S, S]``, ``[1 + rows·cols, 3, S, S]`` or a
    clip's ``[F, 3, S, S]``."""
    return image.views if isinstance(image, (TiledImage, VideoClip)) else image[None]


def image_grid(image: Media) -> tuple[int, int]:
    """``(rows, cols)`` of a preprocessed image's tiles; ``(0, 0)`` for a single view or a clip."""
    return (image.rows, image.cols) if isinstance(image, TiledImage) else (0, 0)


def image_frames(image: Media) -> int:
    """A clip's frames; 1 for a still image."""
    return image.views.shape[0] if isinstance(image, VideoClip) else 1


def visual_tokens_of(image: Media, tokens_per_view: int) -> int:
    """LLM positions a preprocessed item takes (see :func:`~owl_lightning.config.visual_tokens_of_grid`)."""
    return visual_tokens_of_grid(tokens_per_view, *image_grid(image), image_frames(image))


def select_best_grid(width: int, height: int, tile_size: int, grids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(rows, cols)`` grid of ``tile_size`` tiles that shows a ``width × height`` image best, as
    LLaVA-NeXT's ``select_best_resolution``: the most of the image's own pixels kept once it is scaled
    to fit the grid (never more than it has: upscaling adds no detail), then the fewest padding pixels;
    the first listed grid on a tie."""

    def score(grid: Sequence[int]) -> tuple[int, int]:
        rows, cols = grid
        grid_width, grid_height = cols * tile_size, rows * tile_size
        scale = min(grid_width / width, grid_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, -(grid_width * grid_height - kept)

    rows, cols = max(grids, key=score)  # max keeps the first of equal scores
    return rows, cols


def fill_colour(cfg: VisionConfig) -> tuple[int, int, int]:
    """The encoder's normalisation mean as 0–255 RGB: padding of this colour normalises to zero."""
    return tuple(round(channel * 255) for channel in vision_data_config(cfg)["mean"])


class PadToSquare:
    """PIL RGB image → uint8 ``[3, S, S]``: the whole image, centred on a square of ``fill``.

    Resized, then padded (LLaVA-1.5 pads, then resizes): the same geometry up to a pixel's rounding,
    but the resize reads only the image's own pixels, and the padding keeps exactly the fill colour
    rather than a blend of it and the image's edge.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        data = vision_data_config(cfg)
        self.size: int = data["input_size"][-1]
        self.fill = fill_colour(cfg)
        self.interpolation = str_to_interp_mode(data["interpolation"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.fit(TF.pil_to_tensor(image), self.size, self.size)

    def fit(self, pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """uint8 ``[3, h, w]`` → ``[3, height, width]``: scaled to fit, aspect ratio kept, centred on the fill colour."""
        source_height, source_width = pixels.shape[-2:]
        scale = min(width / source_width, height / source_height)
        inner_width = min(width, max(1, round(source_width * scale)))
        inner_height = min(height, max(1, round(source_height * scale)))
        resized = TF.resize(pixels, [inner_height, inner_width], self.interpolation, antialias=True)
        canvas = torch.tensor(self.fill, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
        top, left = (height - inner_height) // 2, (width - inner_width) // 2
        canvas[:, top : top + inner_height, left : left + inner_width] = resized
        return canvas

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill}, interpolation={self.interpolation.value})"


class AnyResTiles(PadToSquare):
    """PIL RGB image → :class:`TiledImage`: the padded global view, then the tiles of the best grid.

    The image is resized to fit the grid (:func:`select_best_grid`), aspect ratio kept, centred on the
    fill colour, and cut into ``S × S`` tiles. LLaVA-NeXT squashes its global view to a square; here it
    is the ``pad`` view, so shapes keep their proportions in it as they do in the tiles.
    """

    def __init__(self, cfg: VisionConfig, grids: Sequence[Sequence[int]]) -> None:
        super().__init__(cfg)
        self.grids = [tuple(grid) for grid in grids]

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """``(rows, cols)`` of a ``width × height`` image."""
        return select_best_grid(width, height, self.size, self.grids)

    def __call__(self, image: Image.Image) -> TiledImage:
        pixels = TF.pil_to_tensor(image)
        rows, cols = self.grid(*image.size)
        size = self.size
        canvas = self.fit(pixels, cols * size, rows * size)  # [3, rows·S, cols·S]
        tiles = canvas.unflatten(1, (rows, size)).unflatten(3, (cols, size)).permute(1, 3, 0, 2, 4).flatten(0, 1)
        views = torch.cat([self.fit(pixels, size, size)[None], tiles])
        return TiledImage(views, rows, cols)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, grids={self.grids})"


def image_preprocess(config: OwlConfig) -> Callable[[Image.Image], torch.Tensor | TiledImage]:
    """The model's image preprocessing (``image.mode``): PIL RGB image → uint8 ``[3, S, S]``, or a
    :class:`TiledImage` under ``anyres``. Built from the config alone: data workers make it cheaply."""
    mode = config.image.mode
    if mode == "crop":
        return image_transform(config.vision)
    if mode == "pad":
        return PadToSquare(config.vision)
    return AnyResTiles(config.vision, config.image.tile_grids)


def frame_preprocess(config: OwlConfig) -> Callable[[Image.Image], torch.Tensor]:
    """One video frame → uint8 ``[3, S, S]``, one view: ``crop`` and ``pad`` as images are; under ``anyres``
    the padded global view alone (tiling every frame would multiply a clip's tokens by the tiles)."""
    return image_transform(config.vision) if config.image.mode == "crop" else PadToSquare(config.vision)


def image_token_counter(config: OwlConfig) -> Callable[[Image.Image], int] | None:
    """Where an image's LLM positions depend on its size (``anyres``): decoded image → its visual tokens.
    ``None`` where every image takes ``visual_tokens_per_image(config)``."""
    if config.image.mode != "anyres":
        return None
    return _AnyResTokenCounter(AnyResTiles(config.vision, config.image.tile_grids), visual_tokens_per_image(config))


class _AnyResTokenCounter:
    """Picklable (data workers may be spawned): an image's size → its grid → its visual tokens."""

    def __init__(self, tiles: AnyResTiles, tokens_per_view: int) -> None:
        self.tiles, self.tokens_per_view = tiles, tokens_per_view

    def __call__(self, image: Image.Image) -> int:
        return visual_tokens_of_grid(self.tokens_per_view, *self.tiles.grid(*image.size))
