"""MaaS Mesh services: one package per service plus `shared` for what every service needs."""
