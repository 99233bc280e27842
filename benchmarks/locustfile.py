"""Load-test the prediction endpoint with locust, the tool most teams already know.

    pip install -e '.[bench]'
    locust -f benchmarks/locustfile.py --headless -u 32 -r 32 -t 30s --host http://127.0.0.1:8000

Each simulated user posts one CIFAR-10 JPEG to /predict back to back (the same image and
request as benchmarks/serve_load.py). A 503 from backpressure counts as a failure, named
as such; a user that gets one waits out its Retry-After, as a polite client does. Drop
--headless for locust's web UI on http://localhost:8089.
"""

import sys
from pathlib import Path

from locust import FastHttpUser, task

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import sample_jpeg  # noqa: E402  (the benchmarks folder is not a package)

JPEG = sample_jpeg()


class PredictUser(FastHttpUser):
    retry_after = 0.0

    @task
    def predict(self) -> None:
        with self.client.post("/predict", data=JPEG, headers={"content-type": "image/jpeg"},
                              catch_response=True) as response:
            if response.status_code == 503:
                response.failure("503 overloaded")
                self.retry_after = float(response.headers.get("retry-after") or 1)
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif "class_name" not in response.json():
                response.failure("answer without class_name")

    def wait_time(self) -> float:
        """No pause between requests, except the Retry-After of a 503."""
        pause, self.retry_after = self.retry_after, 0.0
        return pause
