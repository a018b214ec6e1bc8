"""Train AlexNet-small on Fashion-MNIST and save its learning curves and the model.

AlexNet's shape (Krizhevsky et al., 2012) scaled to 28x28 images: five 3x3 convolutions (64, 192, 384,
256, 256 maps) with ReLU and three max poolings, then dropout and dense 2304-1024-1024-10: 5,670,602
parameters. The full run trains 15 epochs with SGD (lr 0.02, momentum 0.9, weight decay 5e-4) on
a GPU. On the CPU it is slow (some 50 to 100 images a second on two cores: a full run would take
hours): there it trains on the first --limit images (5,000 unless you say otherwise). --quick trains
two epochs on 192 images. Writes curves.png and model.npz.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

from gpucnn import backend, models

CPU_LIMIT = 5000


def options(parser):
    parser.add_argument("--epochs", type=int, default=None, help="default 15 (2 with --quick)")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"train on the first N training images (default: all on a GPU, {CPU_LIMIT} on the CPU, "
                             "192 with --quick)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)


def main():
    args = _common.setup("train_alexnet_small", __doc__, options)
    epochs = args.epochs or (2 if args.quick else 15)
    limit = args.limit or (192 if args.quick else None)
    if limit is None and args.device != "cuda":
        limit = CPU_LIMIT
        print(f"note: AlexNet-small is slow on the {args.device} (some 50 to 100 images a second on two CPU cores: "
              f"{epochs} epochs of 60,000 images would take hours), so this run trains on the first {limit} images; "
              "pass --limit N to choose, or run it on a GPU")
    train, test = _common.fashion_mnist()
    if limit:
        train, test = train.limit(limit), test.limit(128 if args.quick else max(limit // 2, 256))
    backend.seed(0)
    model = models.alexnet_small(in_channels=train.shape[0], num_classes=train.num_classes,
                                 input_size=train.shape[1], seed=0)
    batch = min(args.batch_size, 64) if args.quick else args.batch_size
    _common.fit_and_save(args, model, train, test, epochs, batch, "AlexNet-small on Fashion-MNIST")


if __name__ == "__main__":
    main()
