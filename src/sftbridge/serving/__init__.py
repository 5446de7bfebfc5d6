"""Endpoints: the local HTTP server (``server``) and its wire format (``wire``), SageMaker real-time endpoints
(``deploy``), and the defaults both show in the CLI's help (``defaults``)."""
