"""Act: carry out a Plan, safely. Every kill and score write is PID-reuse safe."""
