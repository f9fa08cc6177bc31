"""Live statistics, Prometheus metrics, the statistics page and best charging hours."""
