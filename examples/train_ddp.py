"""A custom multi-process training loop for an SPE model: timm's create_model, optimizer, scheduler and data, PyTorch's
DistributedDataParallel, launched by torchrun. The loop any timm model needs; SPE adds nothing to it:

- the Eq. 8 penalty needs no term in the loss: each SPE layer adds its gradient in backward (on every rank), and DDP
  averages the gradients over the ranks, so the penalty counts once, as in one process (tests/unit/test_distributed.py);
- the resume state is the model and optimizer, saved by rank 0 after each epoch; every rank loads it;
- BatchNorm's running statistics are averaged over the ranks after each epoch (train.py's ``--dist-bn reduce``).

Run (CPU: the gloo backend; GPUs: nccl, one process per GPU)::

    torchrun --nproc_per_node=2 examples/train_ddp.py --data-dir data/cifar10-jpeg --output runs/ddp --epochs 2
    torchrun --nproc_per_node=2 examples/train_ddp.py --data-dir data/cifar10-jpeg --output runs/ddp --epochs 4 --resume

``--data-dir`` holds ``train/<class>/*`` image folders (the CIFAR-10 JPEG copy that ``./run.sh train`` unpacks).
``--batch-size`` is per process: the global batch is it times the number of processes. Writes ``last.pth`` (resume
state: ``torch.load(..., weights_only=True)`` reads it) and ``summary.csv`` (epoch, mean train loss, lr) to
``--output``. timm's own train.py does more (eval, EMA, AMP, logging); docs/training.md gives its torchrun command.
"""
import argparse
import csv
import os
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import timm_spe  # noqa: F401 (registers the SPE models and the pad4 crop)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet83_spe')
    parser.add_argument('--data-dir', required=True, help='a folder with train/<class>/* images')
    parser.add_argument('--output', required=True, help='the run folder (resume state, summary.csv)')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=32, help='per process')
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--decay-milestones', type=int, nargs='*', default=[82, 123],
                        help='epochs where lr drops x0.1 (the paper: 82 123 of 164)')
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--resume', action='store_true', help="continue from --output's last.pth")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    out = Path(args.output)
    state_file = out / 'last.pth'
    if args.resume and not state_file.is_file():
        raise SystemExit(f'train_ddp.py: --resume, but {state_file} does not exist: drop --resume to start a new run')
    if not args.resume and state_file.exists():
        raise SystemExit(f'train_ddp.py: {out} already holds a run ({state_file.name}): add --resume to continue it, '
                         'or give another --output')
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')  # rank, world size: torchrun's env
    primary = dist.get_rank() == 0

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = timm.create_model(args.model, num_classes=10).to(device)
    optimizer = create_optimizer_v2(model, 'momentum', lr=args.lr, weight_decay=args.weight_decay, momentum=0.9,
                                    filter_bias_and_bn=False)
    scheduler, _ = create_scheduler_v2(optimizer, 'multistep', num_epochs=args.epochs,
                                       decay_milestones=args.decay_milestones, decay_rate=0.1)
    start_epoch = 0
    if args.resume:
        state = torch.load(state_file, map_location=device, weights_only=True)  # tensors and numbers only
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        start_epoch = state['epoch'] + 1
    if start_epoch > 0:  # as timm's train.py: the resumed epoch's lr (a new run starts at --lr)
        scheduler.step(start_epoch)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)

    config = resolve_data_config(model=model)
    dataset = create_dataset('', root=args.data_dir, split='train', is_training=True,
                             transform=create_transform(**config, is_training=True, train_crop_mode='pad4',
                                                        color_jitter=None))  # the paper's crop + flip
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)  # each rank its own share of each epoch
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total, steps = torch.zeros((), device=device), 0
        for x, y in tqdm(loader, desc=f'epoch {epoch}', disable=not primary):
            loss = loss_fn(ddp(x.to(device)), y.to(device))  # no penalty term: SPE's backward adds it
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients, the penalty's included, over the ranks
            optimizer.step()
            total += loss.detach()
            steps += 1
        # each rank's last forward updated its own BatchNorm running statistics: average them, as timm's train.py
        # does with its default --dist-bn reduce, so that every rank (and the saved state) holds the same model
        distribute_bn(model, dist.get_world_size(), reduce=True)
        dist.all_reduce(total)
        lr = optimizer.param_groups[0]['lr']
        scheduler.step(epoch + 1)
        if primary:
            out.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix('.tmp')
            torch.save({'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict()}, tmp)
            os.replace(tmp, state_file)  # never a half-written resume state
            new = not (out / 'summary.csv').exists()
            with open(out / 'summary.csv', 'a', newline='') as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(['epoch', 'train_loss', 'lr'])
                writer.writerow([epoch, (total / (steps * dist.get_world_size())).item(), lr])
        dist.barrier()  # the next epoch (or a resume) finds the state written
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
