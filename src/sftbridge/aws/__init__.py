"""AWS helpers shared by training jobs and endpoints: pre-flight checks (``preflight``: credentials, account,
a writable bucket) and the Hugging Face token from Secrets Manager (``secrets``)."""
