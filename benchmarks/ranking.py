"""Ranking images by filters: the classic per-image, per-filter `model.predict` loop vs one streamed pass.

Task: the spatial mean of every channel of VGG16 `block3_conv1` (256 channels) for 256 real photos at
224 px, i.e. what a "top images per filter" ranking needs.

Naive = the classic approach: `feature_extractor = keras.Model(model.inputs, layer.output)`; for each
filter, loop over the images, `feature_extractor.predict(one image)`, take the filter's channel mean. It
costs images x filters forward passes, so it is measured on a few filters and a subset of images and
extrapolated linearly to all 256 channels (the output says so). Images are decoded once (not once per
filter) and one warm-up predict is left out of the timing, both in the naive approach's favour.

reportgen = `reportgen.engine.forward.forward(...)`: one `tf.data` stream (parallel decode/resize,
prefetch), one traced multi-output program, channel means reduced on the device; measured in full.

The 256 images are crops / flips of the bundled photos (`builtin_folder("sample-photos")`) written as
JPEG files into a temporary folder, so decoding is part of the measured work.

    python benchmarks/ranking.py                                   # 256 images, classic on 4 x 16
    python benchmarks/ranking.py --images 32 --classic-filters 2 --classic-images 4   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peak as peak_mod  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ONEDNN_MODES,
    RAW,
    Row,
    build_model,
    forward_flops,
    machine,
    markdown_table,
    select_kernels,
)

JPEG_QUALITY = 90


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """`count` seeded crop / flip variations of the bundled photos, `size` x `size` JPEGs."""
    import numpy as np
    from PIL import Image

    from reportgen.datasets import IMAGE_SUFFIXES, builtin_folder

    folder_in = builtin_folder("sample-photos")
    sources = sorted(p for p in folder_in.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    photos = [Image.open(p).convert("RGB") for p in sources]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        im = photos[i % len(photos)]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        path = folder / f"img_{i:04d}.jpg"
        crop.save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def classic(lm: Any, layer: str, items: list[Any], filters: list[int]) -> tuple[float, float, Any]:
    """(seconds per image decode, seconds per predict, means (images, filters)) of the classic loop."""
    import keras
    import numpy as np

    from reportgen.datasets import load_pixels

    feature_extractor = keras.Model(inputs=lm.model.inputs, outputs=lm.layer(layer).output)
    t0 = time.perf_counter()
    pixels = [load_pixels([it], lm.input_size, lm.channels)[0] for it in items]
    decode = (time.perf_counter() - t0) / len(items)
    inputs = [lm.preprocess(p).numpy() for p in pixels]
    feature_extractor.predict(inputs[0], verbose=0)  # warm-up: builds the predict function (not timed)
    means = np.empty((len(items), len(filters)), np.float32)
    t0 = time.perf_counter()
    for j, filter_index in enumerate(filters):
        for i, x in enumerate(inputs):
            activation = feature_extractor.predict(x, verbose=0)
            means[i, j] = activation[0, :, :, filter_index].mean()
    per_predict = (time.perf_counter() - t0) / (len(items) * len(filters))
    return decode, per_predict, means


def streamed(lm: Any, layer: str, items: list[Any], batch: int) -> tuple[float, float, Any]:
    """(seconds end to end, steady seconds per image after the first batch, means (images, channels))."""
    from reportgen.engine.forward import forward

    marks: list[float] = []
    sizes: list[int] = []

    def on_batch(n: int) -> None:
        marks.append(time.perf_counter())
        sizes.append(n)

    t0 = time.perf_counter()
    result = forward(lm, items, [layer], batch_size=batch, on_batch=on_batch)
    seconds = time.perf_counter() - t0
    if result.missing:
        raise RuntimeError(f"{len(result.missing)} benchmark images failed to decode")
    steady = (marks[-1] - marks[0]) / sum(sizes[1:]) if len(sizes) > 1 else seconds / len(items)
    return seconds, steady, result.means[layer]


def run(model: str, layer: str, images: int, size: int, batch: int, classic_filters: int, classic_images: int,
        peaks: dict[str, float]) -> Row:
    import numpy as np

    from reportgen.datasets import ImageItem

    lm = build_model(model)
    channels = lm.layer_channels(layer)
    peak = peaks["float32"]
    lm.input_size = (size, size)  # the streamed pass decodes to the model's input size: make it --size
    fwd = forward_flops(lm.model, lm.layer(layer).output, (size, size), lm.channels)
    print(f"\n## ranking: {model} {layer} ({channels} channels), {images} images at {size} px")
    print(f"forward to {layer}: {fwd / 1e9:.2f} GFLOP/image; forward floor for {images} images at the "
          f"measured float32 peak ({peak:.0f} GFLOP/s): {images * fwd / peak / 1e9:.2f} s "
          f"({peak * 1e9 / fwd:.1f} images/s)")
    with tempfile.TemporaryDirectory(prefix="reportgen-bench-ranking-") as tmp:
        paths = write_images(Path(tmp), images, size)
        items = [ImageItem(p, p.name, None, None) for p in paths]

        e_seconds, e_steady, means = streamed(lm, layer, items, batch)
        sub = items[: min(classic_images, images)]
        filt = list(range(min(classic_filters, channels)))
        decode, per_predict, c_means = classic(lm, layer, sub, filt)

    n_seconds = decode * images + per_predict * images * channels  # linear in images x filters
    n_rate, e_rate = images / n_seconds, images / e_seconds
    diff = np.abs(c_means - means[: len(sub), filt])
    rel = float((diff / np.maximum(np.abs(means[: len(sub), filt]), 1e-6)).max())
    print(f"naive     : measured {len(filt)} filters x {len(sub)} images = {len(filt) * len(sub)} predicts, "
          f"{per_predict * 1e3:.1f} ms/predict, {decode * 1e3:.1f} ms/decode; EXTRAPOLATED linearly to "
          f"{channels} filters x {images} images: {n_seconds:.0f} s = {n_rate:.3f} images/s")
    print(f"reportgen : measured in full: {e_seconds:.2f} s = {e_rate:.2f} images/s end to end "
          f"(batch {batch}, trace included); after the first batch {1 / e_steady:.2f} images/s")
    print(f"ratio     : {e_rate / n_rate:.0f}x (extrapolated naive / measured reportgen)")
    print(f"fraction of the measured float32 peak: reportgen {e_rate * fwd / 1e9 / peak:.1%} end to end, "
          f"{fwd / e_steady / 1e9 / peak:.1%} steady; naive {n_rate * fwd / 1e9 / peak:.3%} useful "
          f"(each predict alone runs at {fwd / per_predict / 1e9 / peak:.1%}, but every image is recomputed "
          f"for every filter)")
    print(f"agreement : channel means differ by at most {rel:.2e} (relative) on the measured subset")
    return Row(
        case=f"ranking: {model} {layer}, all {channels} channels, {images} images at {size} px "
             f"(naive extrapolated from {len(filt)}x{len(sub)})",
        unit="images/s", naive=n_rate, reportgen=e_rate, speedup=e_rate / n_rate,
        naive_fraction=n_rate * fwd / 1e9 / peak, reportgen_fraction=e_rate * fwd / 1e9 / peak,
        notes=[f"forward floor {images * fwd / peak / 1e9:.2f} s"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--model", default="vgg16-hed",
                        help="vgg16-hed (VGG16 with real weights, bundled) or a keras.applications name")
    parser.add_argument("--layer", default="block3_conv1")
    parser.add_argument("--images", type=int, default=256, help="images in the streamed pass (default 256)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=8, help="the streamed pass's batch size (default 8)")
    parser.add_argument("--classic-filters", type=int, default=4, help="filters the naive loop is timed on")
    parser.add_argument("--classic-images", type=int, default=16, help="images the naive loop is timed on")
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen",
                        help="CPU kernels: as `reportgen run` picks (default: oneDNN off), or forced")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix side of the peak measurement")
    args = parser.parse_args(argv)
    select_kernels(args.onednn)
    print(machine())
    peaks, described = peak_mod.measure(args.peak_size, dtypes=("float32",))
    print(described)
    row = run(args.model, args.layer, args.images, args.size, args.batch, args.classic_filters,
              args.classic_images, peaks)
    print()
    print(markdown_table([row]))
    print(peak_mod.stability(peaks, peak_mod.measure(args.peak_size, dtypes=("float32",))[0]))


if __name__ == "__main__":
    main()
