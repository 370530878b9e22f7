"""The `peft-diffusion` command (`main.py`), one module per command (`convert`, `generate`, `eval`), the demo after
`convert` (`demo.py`), the terminal view and trajectory picture (`live.py`) and the offline defaults (`defaults.py`).
"""
