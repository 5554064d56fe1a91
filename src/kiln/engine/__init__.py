"""Engine construction (``build``), execution plan, static memory plan and the ``.kiln`` file."""
