"""Write hf_demo.parquet: demo records in the layout of TRL's vision datasets on the Hugging Face Hub
(`messages` with typed parts, an `images` column of `datasets.Image` values holding the files' bytes).

    python data_examples/make_hf_demo.py

Needs the images of make_media.py. `vlft sft --data_path data_examples/hf_demo.parquet` writes the embedded
images once into $VLFT_CACHE/media and trains on them; records and ids are those of llava_demo.json.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = {"type": "image", "text": None}  # datasets stores every part with the same keys: absent ones are None
RECORDS = [
    ("single_image", ["red_square.png"],
     [{"role": "user", "content": [IMAGE, text("What is in the picture?")]},
      {"role": "assistant", "content": [text("The image shows a red square on a blue background.")]}]),
    ("multi_image", ["red_square.png", "green_circle.png"],
     [{"role": "user", "content": [IMAGE, IMAGE, text("Compare the two images.")]},
      {"role": "assistant", "content": [text("The first image is red and the second image is green.")]}]),
    ("exif_rotated", ["rotated_arrow.jpg"],
     [{"role": "user", "content": [IMAGE, text("Which way does it point?")]},
      {"role": "assistant", "content": [text("An arrow pointing up.")]}]),
    ("text_only", [],
     [{"role": "user", "content": [text("What is the capital of France?")]},
      {"role": "assistant", "content": [text("The capital of France is Paris.")]}]),
]


def main() -> None:
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
    })
    # the bytes themselves, as a dataset downloaded from the Hub holds them (the path is only the file's name)
    images = [[{"bytes": (HERE / "images" / f).read_bytes(), "path": f} for f in r[1]] for r in RECORDS]
    data = {"id": [r[0] for r in RECORDS], "images": images,
            "messages": [r[2] for r in RECORDS]}
    dataset = datasets.Dataset.from_dict(data, features=features)
    dataset.to_parquet(str(HERE / "hf_demo.parquet"))


if __name__ == "__main__":
    main()
