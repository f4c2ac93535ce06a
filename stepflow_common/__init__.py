"""Pure rules and plumbing shared by monitor_svc and orchestrator_svc (no storage here)."""
