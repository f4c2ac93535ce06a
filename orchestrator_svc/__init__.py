"""The orchestrator service: runs job definitions and streams child events to the monitor."""
