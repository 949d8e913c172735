"""`python -m gpt2_onnx`: the gpt2-onnx command line."""

from gpt2_onnx.cli import main

if __name__ == "__main__":
    main()
