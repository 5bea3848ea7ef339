"""What every MaaS Mesh service needs: server bootstrap, config, errors, logging, telemetry."""
