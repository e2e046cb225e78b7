"""Speed: the cost model (costmodel.py, pure), measuring it on this machine (measure.py),
the few-row linear kernels (kernels.py) and which one each verify size takes here
(kernelchoice.py), and the machine's facts (machine.py)."""
