"""Shared fixtures: the real default model, and tiny random models of each architecture."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so that the
# `triton` backend is tested on every machine. The interpreter is chosen when a kernel
# is defined: before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from services.engine import Engine  # noqa: E402


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The default model (SmolLM2-135M-Instruct) in float32, shared by the session."""
    return Engine.from_pretrained("default", dtype="float32")


@pytest.fixture(scope="session")
def bf16_engine() -> Engine:
    """The default model in bfloat16, as served."""
    return Engine.from_pretrained("default", dtype="bfloat16")


TINY = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 40}),
}


def make_tiny(kind: str, path, engine: Engine | None = None):
    """Save a randomly initialised model of architecture `kind` to `path`."""
    import transformers

    cls_name, extra = TINY[kind]
    config = getattr(transformers, cls_name)(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=kind in ("llama", "qwen3"),
        initializer_range=0.2,  # peaked logits: random models otherwise sit near ties
        **extra,
    )
    torch.manual_seed(len(kind))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if engine is not None:
        engine.tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, bf16_engine):
    """A function that saves a tiny random model of architecture `kind` and gives its folder."""

    def save(kind: str):
        path = tmp_path_factory.mktemp(kind)
        make_tiny(kind, path, bf16_engine)
        return path

    return save


@pytest.fixture(scope="session", params=list(TINY))
def tiny(request, tmp_path_factory, engine):
    """(kind, HF model, our engine) for one tiny architecture."""
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, path, engine)
    ours = Engine.from_pretrained(str(path), dtype="float32", kv_cache_bytes=64 << 20)
    return request.param, hf, ours


class OtlpReceiver:
    """A real OTLP metrics endpoint on loopback: keeps every export it is sent."""

    def __init__(self) -> None:
        import threading
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2 as pb,
        )
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2_grpc as rpc,
        )

        receiver = self
        self.requests: list = []
        self._lock = threading.Lock()

        class Service(rpc.MetricsServiceServicer):
            def Export(self, request, context):
                with receiver._lock:
                    receiver.requests.append(request)
                return pb.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        rpc.add_MetricsServiceServicer_to_server(Service(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server.start()

    def env(self, interval_ms: int = 300) -> dict[str, str]:
        """The environment that sends a component's metrics here."""
        return {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": str(interval_ms),
        }

    def latest(self, service: str) -> dict:
        """{metric name: OTLP Metric} from the newest export by `service.name`."""
        with self._lock:
            requests = list(self.requests)
        for request in reversed(requests):
            for rm in request.resource_metrics:
                attrs = {a.key: a.value.string_value for a in rm.resource.attributes}
                if attrs.get("service.name") == service:
                    return {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
        return {}


@pytest.fixture(scope="session")
def otlp_receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.stop(0)
