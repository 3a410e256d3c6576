"""itsm-alert-bridge: monitoring alerts in, exactly one ITSM incident per problem out."""

__version__ = "0.1.0"
