"""Glimpse: serve GLM-4.5V / GLM-4.6V as gRPC microservices. This package holds the CLI only."""

__version__ = "0.1.0"
