"""The concrete stages of ``edgeforge build`` (each one a ``edgeforge.build.stage.Stage``) and the ship step."""
