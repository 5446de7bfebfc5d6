"""Settings of the local endpoint, apart from the server so that `sftbridge --help` stays light."""

from dataclasses import dataclass

DEFAULT_PORT = 8080  # SageMaker's container port


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # loopback only unless asked: the server has no authentication
    port: int = DEFAULT_PORT
    max_new_tokens_cap: int = 1024  # TGI's default max_total_tokens is 2048, half for new tokens
    max_queue: int = 16  # requests waiting behind the one being generated; more get 429
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0  # a request still waiting for the model after this gets 503
