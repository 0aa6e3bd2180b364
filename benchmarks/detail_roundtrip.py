"""Does detail restoration beat plain resizing for a picture edited below its own size?

A 2048 x 2048 procedural picture (1/f colour noise, hard-edged shapes, fine stripes and a checkerboard, so
every frequency band holds something) is taken to the SD1.5 working size by the pack's own resolution policy
(512 x 512), "edited" there, and brought back to 2048 px two ways: plain resizing, and
``resolution.restore_detail``. The edit is synthetic (a disc's content replaced by another texture) because
the tests' tiny random model produces noise, not edits; on top of it the VAE's reconstruction error of the
whole working picture is simulated at four levels (a blur plus noise; its PSNR at working size is printed,
a real SD VAE reconstructs photos at roughly 25-32 dB). Printed: PSNR against the input of
the unedited part (pixels more than 16 px from the edited disc) and of all unedited pixels, and PSNR of the
edited disc against the same edit made at full resolution (restoration must not bring the old picture back
there). Run: ``python benchmarks/detail_roundtrip.py`` (CPU, about a minute).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ip2p_nodes.pipeline_core.editing import resolution

SIZE = 2048


def fractal_noise(size: int, channels: int, gen: torch.Generator, octaves: int = 9) -> torch.Tensor:
    """[1,C,size,size] with a roughly 1/f spectrum, as natural pictures have."""
    out = torch.zeros(1, channels, size, size)
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = torch.rand(1, channels, cells, cells, generator=gen)
        out += F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False) / (1.6**o)
    out -= out.amin(dim=(2, 3), keepdim=True)
    return out / out.amax(dim=(2, 3), keepdim=True)


def procedural_picture(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    img = 0.15 + 0.7 * fractal_noise(size, 3, gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(12):  # hard-edged shapes
        cy, cx, r = (torch.rand(3, generator=gen) * torch.tensor([size, size, size / 10])).tolist()
        colour = torch.rand(3, 1, 1, generator=gen)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < (r + 20) ** 2
        img[0] = torch.where(inside, 0.5 * img[0] + 0.5 * colour, img[0])
    stripes = 0.5 + 0.5 * torch.sin(xx * (2 * math.pi / 5.0) + yy * 0.3)  # 5 px period: gone at 512 px
    band = (yy > size * 0.72) & (yy < size * 0.8)
    img[0] = torch.where(band, 0.4 * img[0] + 0.6 * stripes, img[0])
    checker = (((yy // 3) + (xx // 3)) % 2).float()  # 3 px checkerboard: text-like detail
    patch = (yy > size * 0.1) & (yy < size * 0.25) & (xx > size * 0.6) & (xx < size * 0.9)
    img[0] = torch.where(patch, 0.3 + 0.4 * checker, img[0])
    return img.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1).float() ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean(1)[0][where].mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    original = procedural_picture(SIZE, seed=1)
    # The "new object" the edit paints into the disc: another picture, with fine diagonal stripes of its own
    # that the working resolution cannot hold (neither method can recover them; the old detail must not return).
    replacement = procedural_picture(SIZE, seed=2)
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    replacement = (0.6 * replacement + 0.4 * (0.5 + 0.5 * torch.sin((xx + yy) * (2 * math.pi / 6.0)))).clamp(0, 1)
    size = resolution.working_size(SIZE, SIZE, "sd15")
    print(f"input {SIZE}x{SIZE}, working size {size.content_width}x{size.content_height} (sd15 policy)")

    dist = ((yy - SIZE * 0.45) ** 2 + (xx - SIZE * 0.35) ** 2).sqrt() - SIZE * 0.2  # >0 outside the disc
    edit_alpha = (0.5 - dist / 8).clamp(0, 1)[None, None]  # a 16 px soft edge, as a real edit has
    ideal = original + edit_alpha * (replacement - original)  # the same edit made at full resolution
    far = dist > 16
    unedited = dist > 8
    edited = dist < -8

    low_input = resolution.resize(original, size.content)
    low_ideal = resolution.resize(ideal, size.content)
    gen = torch.Generator().manual_seed(3)
    everywhere = torch.ones(size.content, dtype=torch.bool)
    header = f"{'VAE error: blur, noise (PSNR)':31s} {'method':10s}"
    print(f"{header} {'unedited>16px':>14s} {'unedited':>9s} {'edited disc':>12s}")
    for blur, noise in [(0.0, 0.0), (0.6, 0.01), (1.0, 0.02), (1.5, 0.04)]:
        low_edit = gaussian_blur(low_ideal, blur) + noise * torch.randn(low_ideal.shape, generator=gen)
        low_edit = low_edit.clamp(0, 1)
        vae_psnr = psnr(low_edit, low_ideal, everywhere)
        plain = resolution.resize(low_edit, (SIZE, SIZE))
        t0 = time.perf_counter()
        restored = resolution.restore_detail(original, low_input, low_edit)
        dt = time.perf_counter() - t0
        label = f"{blur:.1f} px, {noise:.2f} ({vae_psnr:.1f} dB)"
        for name, out in (("plain", plain), ("restored", restored)):
            print(
                f"{label:31s} {name:10s} {psnr(out, original, far):11.2f} dB {psnr(out, original, unedited):6.2f} dB "
                f"{psnr(out, ideal, edited):9.2f} dB"
            )
        print(f"{'':31s} restore_detail took {dt:.2f} s at {SIZE}x{SIZE}")


if __name__ == "__main__":
    main()
