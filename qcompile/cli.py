"""The ``qcompile`` command."""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="quantize a Llama, compile it, print explain() and the outputs")
    dump = sub.add_parser("dump", help="run a script with graph dumps on and summarise what matched")
    dump.add_argument("--out", help="dump folder (default qcompile_debug/<time>)")
    dump.add_argument("script")
    dump.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo
        demo()
    elif args.command == "dump":
        from .dump import main as dump_main
        dump_main(args.script, args.args, args.out)


if __name__ == "__main__":
    main()
