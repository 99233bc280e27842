"""The peer Serve is measured against: the same checkpoint behind plain FastAPI + uvicorn.

    python benchmarks/plain_server.py --checkpoint runs/NAME/epoch_0002 [--port 8001]
    curl --data-binary @cat.jpg -H 'content-type: image/jpeg' localhost:8001/predict

What a user could write in an afternoon instead of Ray Serve, written as well as we can:
one process, no Ray, no batching; the same decode (cifar_ray.images.decode_image) and the
same compiled `tf.function` forward pass as the Serve replica, called per request from
FastAPI's thread pool (a sync endpoint), so the event loop only does HTTP.
benchmarks/serve_load.py starts it as a subprocess and drives it with the same client.
"""

import argparse

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request

from cifar_ray.errors import DataSourceError
from cifar_ray.images import decode_image
from cifar_ray.live_model import load


async def read_body(request: Request) -> bytes:
    """The raw body, read on the event loop before the endpoint's thread runs."""
    return await request.body()


def make_app(checkpoint: str) -> FastAPI:
    from pathlib import Path

    model = load(Path(checkpoint), version="plain")
    names = model.metadata["class_names"]
    api = FastAPI()

    @api.post("/predict")
    def predict(body: bytes = Depends(read_body)) -> dict:
        try:
            image = decode_image(body, resize=True)
        except DataSourceError as e:
            raise HTTPException(400, str(e)) from None
        p = model.predict(image[None])[0]
        ranked = np.argsort(-p)[:3]
        return {"class_name": names[int(ranked[0])], "class_index": int(ranked[0]),
                "top_k": [{"class_name": names[int(i)], "probability": float(p[i])} for i in ranked]}

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a local checkpoint folder")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(make_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
