"""The ``qcompile`` command."""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="quantize a Llama, compile it, print explain() and the outputs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo
        demo()


if __name__ == "__main__":
    main()
