"""Web user interfaces served by the API, and Grafana dashboards."""
