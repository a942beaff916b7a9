"""Draw the tiny example images, one per colour mode / file quirk that load_image must handle.

    python data_examples/make_media.py

Writes data_examples/images/; deterministic, so rerunning it leaves git clean.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "images"
EXIF_ORIENTATION = 0x0112


def red_square() -> None:
    img = Image.new("RGB", (56, 48), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((16, 12, 39, 35), fill=(255, 0, 0))
    img.save(OUT / "red_square.png")


def green_circle() -> None:
    img = Image.new("RGBA", (48, 48), (0, 0, 0, 0))  # transparent black: a loader that drops alpha shows black
    ImageDraw.Draw(img).ellipse((8, 8, 39, 39), fill=(0, 200, 0, 255))
    img.save(OUT / "green_circle.png")


def blue_triangle() -> None:
    img = Image.new("P", (40, 56), 0)
    img.putpalette([255, 255, 255, 0, 0, 255])
    ImageDraw.Draw(img).polygon([(20, 8), (34, 46), (6, 46)], fill=1)
    img.save(OUT / "blue_triangle.gif")


def gray_gradient() -> None:
    img = Image.new("L", (64, 32))
    img.putdata([x * 4 for _ in range(32) for x in range(64)])
    img.save(OUT / "gray_gradient.png")


def yellow_cmyk() -> None:
    img = Image.new("CMYK", (48, 40), (0, 0, 0, 255))
    ImageDraw.Draw(img).rectangle((12, 10, 35, 29), fill=(0, 0, 255, 0))
    img.save(OUT / "yellow_cmyk.jpg", quality=90)


def rotated_arrow() -> None:
    # Drawn as it should be seen (64x40, arrow up), then stored turned a quarter left; EXIF orientation 6 tells
    # viewers to turn it a quarter right again, as phone cameras do.
    upright = Image.new("RGB", (64, 40), (255, 255, 255))
    draw = ImageDraw.Draw(upright)
    draw.polygon([(32, 2), (46, 18), (18, 18)], fill=(0, 0, 0))
    draw.rectangle((28, 18, 36, 37), fill=(0, 0, 0))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(OUT / "rotated_arrow.jpg", quality=90, exif=exif)


def cat_sketch() -> None:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    orange, dark = (240, 140, 30), (60, 40, 20)
    draw.polygon([(14, 26), (18, 6), (30, 20)], fill=orange)  # ears first so the head overlaps them
    draw.polygon([(34, 20), (46, 6), (50, 26)], fill=orange)
    draw.ellipse((10, 16, 54, 56), fill=orange)
    draw.ellipse((20, 28, 26, 34), fill=dark)
    draw.ellipse((38, 28, 44, 34), fill=dark)
    draw.polygon([(29, 40), (35, 40), (32, 44)], fill=dark)
    for y in (42, 46):
        draw.line((4, y, 22, 44), fill=dark)
        draw.line((42, 44, 60, y), fill=dark)
    img.save(OUT / "cat_sketch.png")


def counting_shapes() -> None:
    """count_1.png .. count_5.png: N shapes on white (the GRPO demo's counting task, data_examples/grpo_demo.json)."""
    spots = [(6, 6), (36, 8), (20, 30), (6, 44), (40, 42)]
    colours = [(220, 30, 30), (30, 140, 30), (30, 60, 220), (200, 150, 0), (150, 30, 160)]
    for n in range(1, 6):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for k, ((x, y), colour) in enumerate(zip(spots[:n], colours)):
            box = (x, y, x + 16, y + 16)
            draw.ellipse(box, fill=colour) if k % 2 == 0 else draw.rectangle(box, fill=colour)
        img.save(OUT / f"count_{n}.png")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for draw in (red_square, green_circle, blue_triangle, gray_gradient, yellow_cmyk, rotated_arrow, cat_sketch,
                 counting_shapes):
        draw()
    for path in sorted(OUT.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
