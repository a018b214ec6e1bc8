"""Train LeNet-5 (LeCun et al., 1998) on Fashion-MNIST and save its learning curves and the model.

LeNet-5 as in the lecture: two convolution + tanh + average-pooling stages (the "automatic feature
extractor") and three dense layers (the "regular classifier"), here with softmax cross-entropy. The full
run trains 10 epochs on the 60,000 training images with SGD (lr 0.05, momentum 0.9, weight decay 5e-4)
and reaches about 90% test accuracy; --quick trains three epochs on 2,000 images. Writes curves.png
(loss and accuracy per epoch) and model.npz, which what_the_cnn_sees.py and invariance.py take as --model
(deconvnet.py needs ReLU and max pooling: pass --activation relu --pool max).
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

from gpucnn import backend, models


def options(parser):
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (3 with --quick)")
    parser.add_argument("--limit", type=int, default=None,
                        help="train on the first N training images (default all; 2000 with --quick)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--pool", choices=["avg", "max"], default="avg")


def main():
    args = _common.setup("train_lenet5", __doc__, options)
    epochs = args.epochs or (3 if args.quick else 10)
    limit = args.limit or (2000 if args.quick else None)
    train, test = _common.fashion_mnist()
    if limit:
        train, test = train.limit(limit), test.limit(max(limit // 2, 500))
    backend.seed(0)
    model = models.lenet5(activation=args.activation, pool=args.pool, num_classes=train.num_classes, seed=0)
    _common.fit_and_save(args, model, train, test, epochs, args.batch_size,
                         f"LeNet-5 ({args.activation}, {args.pool} pooling) on Fashion-MNIST")


if __name__ == "__main__":
    main()
