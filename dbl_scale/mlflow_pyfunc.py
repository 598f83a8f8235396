"""The MLflow model of an exported dbl_scale dual encoder ("models from code": `export.log_model`
logs this file as it is, with the exported folder as its artifact "model"). It imports only
mlflow, torch, transformers, PIL, numpy and pandas: loading it needs no dbl_scale.

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    embeddings = model.predict(pd.DataFrame({"image": [jpeg_bytes, None], "caption": [None, "a red circle"]}))

Each row holds an encoded image (bytes) or a caption (a string); `predict` returns one joint
embedding per row (float32, L2-normalised; an image when a row holds both).
"""
import io
from typing import Optional

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor


class DualEncoderModel(mlflow.pyfunc.PythonModel):
    batch_size = 64

    def load_context(self, context):
        folder = context.artifacts["model"]
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    # The type hints are MLflow's contract: a DataFrame in (checked against the logged signature),
    # an array out; without them MLflow warns on every load and log.
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> np.ndarray:
        images = model_input["image"].tolist() if "image" in model_input else [None] * len(model_input)
        captions = model_input["caption"].tolist() if "caption" in model_input else [None] * len(model_input)
        out = np.zeros((len(images), self.model.config.embed_dim), dtype=np.float32)
        image_rows = [i for i, x in enumerate(images) if _present(x)]
        text_rows = [i for i, x in enumerate(captions) if _present(x) and i not in set(image_rows)]
        with torch.no_grad():
            for lo in range(0, len(image_rows), self.batch_size):
                rows = image_rows[lo:lo + self.batch_size]
                pixels = [Image.open(io.BytesIO(images[i])).convert("RGB") for i in rows]
                out[rows] = self.model.get_image_features(**self.processor(images=pixels, return_tensors="pt")).numpy()
            for lo in range(0, len(text_rows), self.batch_size):
                rows = text_rows[lo:lo + self.batch_size]
                enc = self.processor(text=[captions[i] for i in rows], padding=True, truncation=True,
                                     return_tensors="pt")
                out[rows] = self.model.get_text_features(enc["input_ids"], enc["attention_mask"]).numpy()
        return out


def _present(x) -> bool:
    return x is not None and not (isinstance(x, float) and np.isnan(x))


mlflow.models.set_model(DualEncoderModel())
