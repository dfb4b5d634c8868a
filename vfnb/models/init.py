"""The two weight initializations of appendix A.4 (Figure 9), shared by the conv nets."""
from __future__ import annotations

#: ``"kaiming_normal"``: He normal, N(0, 2/fan_in), zero bias, on the convolutions (torchvision's VGG init, which the
#: paper's Figure 9 uses, takes the fan-out instead: the same variance where a layer keeps its width);
#: ``"uniform"``: PyTorch's default Kaiming-uniform, U[-1/√fan_in, 1/√fan_in] for weights and biases.
INITS = ("kaiming_normal", "uniform")


def check_init(init: str) -> None:
    """Refuse an unknown initialization name, listing the allowed ones."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
