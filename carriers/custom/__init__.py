"""Carrier-specific adapters: small subclasses of a family's adapter, named by the registry's
``adapter`` field, for the few carriers whose gateways data alone cannot describe."""
