"""Children on many machines: a step whose ``executor`` is ``celery`` sends its children
to runners through a broker (``broker``), the orchestrator publishes them (``dispatch``) and
runners run them (``runner``), each reporting straight to the monitor."""
