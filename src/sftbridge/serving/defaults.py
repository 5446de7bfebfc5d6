"""Defaults of the local endpoint (``serve``) and of SageMaker endpoints (``deploy``).

Plain constants, apart from the server and the SDK code, so that the CLI can show them in its help without
loading either.
"""

HOST = "127.0.0.1"  # loopback only unless asked: the server has no authentication
PORT = 8080  # SageMaker's container port
MAX_NEW_TOKENS_CAP = 1024  # TGI's default max_total_tokens is 2048, half for new tokens
MAX_QUEUE = 128  # requests waiting for the model; more get 429 (a burst of 40 used to get 23 x 429)
MAX_BATCH_SIZE = 32  # concurrent greedy requests generated together
BATCH_WINDOW_S = 0.005  # under load, how long the model waits for more requests to fill a batch
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 300.0  # a request still waiting for the model after this gets 503

INSTANCE_TYPE = "ml.g5.2xlarge"  # one A10G (24 GB): Llama-2-7B in 16-bit with room for the KV cache
S3_PREFIX = "sftbridge/endpoints"
