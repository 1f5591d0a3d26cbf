"""The baseline for benchmarks/app_load.py: a stock Gradio app serving a model through `pipeline`.

    .venv/bin/python benchmarks/stock_app.py --model models/ham10000-resnet50 --port 7870

What a Space built the usual way runs: `pipeline("image-classification")` behind a `gr.Interface`
with Gradio's defaults (one request at a time, a queue without a size limit). Its API name is
`/predict`, with one image input and a Label output.
"""

from __future__ import annotations

import argparse

import gradio as gr
from transformers import pipeline


def main() -> None:
    """Serve the model as a stock app."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=7870)
    a = p.parse_args()
    classify = pipeline("image-classification", model=a.model)

    def predict(image):
        """All class probabilities of one image."""
        return {r["label"]: r["score"] for r in classify(image, top_k=None)}

    gr.Interface(predict, gr.Image(type="pil"), gr.Label(), api_name="predict").launch(
        server_name="127.0.0.1", server_port=a.port)


if __name__ == "__main__":
    main()
