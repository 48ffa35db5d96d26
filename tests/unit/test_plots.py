"""timm_spe.plots: training curves from train.py output and learned SPE lambdas."""
import pytest
import timm
import torch

import timm_spe  # noqa: F401
from timm_spe.plots import plot_lambdas, plot_training_curve, read_summary, read_train_log, spe_lambdas

SUMMARY = 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,1.9,1.6,40.9,90.7,0.075\n1,1.4,1.2,55.0,95.0,0.025\n'
LOG = ('Train: 0 [   0/390 (  0%)]  Loss: 2.32 (2.32)  Time: 14.3s\n'
       'Train: 0 [ 195/390 ( 50%)]  Loss: 1.80 (2.00)  Time: 4.0s\n'
       'Test: [  80/99]  Loss:   1.232\n'
       'Train: 1 [ 390/390 (100%)]  Loss: 1.40 (1.50)  Time: 3.9s\n')


def test_read_summary_and_log(tmp_path):
    (tmp_path / 'summary.csv').write_text(SUMMARY)
    rows = read_summary(tmp_path / 'summary.csv')
    assert [r['eval_top1'] for r in rows] == [40.9, 55.0]
    (tmp_path / 'log').write_text(LOG)
    assert read_train_log(tmp_path / 'log') == [
        {'epoch': 0.0, 'loss': 2.32}, {'epoch': 0.5, 'loss': 1.8}, {'epoch': 2.0, 'loss': 1.4}]
    (tmp_path / 'empty.csv').write_text('epoch,train_loss\n')
    with pytest.raises(ValueError, match='no rows'):
        read_summary(tmp_path / 'empty.csv')


def test_training_curve_png(tmp_path):
    (tmp_path / 'summary.csv').write_text(SUMMARY)
    (tmp_path / 'log').write_text(LOG)
    out = plot_training_curve(tmp_path / 'summary.csv', tmp_path / 'c.png', log=tmp_path / 'log', title='t')
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_lambdas(tmp_path):
    m = timm.create_model('resnet83_spe')
    with torch.no_grad():
        m.layer2[3].se.p.copy_(torch.tensor([3., 1.]))
        m.layer3[8].se.p.zero_()
    rows = spe_lambdas(m)
    assert len(rows) == 27 and rows[0]['block'] == 'layer1.0' and rows[-1]['block'] == 'layer3.8'
    by_block = {r['block']: r['lambda'] for r in rows}
    assert by_block['layer2.3'] == pytest.approx(0.9) and by_block['layer1.0'] == 0.5
    assert by_block['layer3.8'] == 0.5  # finite at p = 0
    assert plot_lambdas(rows, tmp_path / 'l.png').read_bytes()[:4] == b'\x89PNG'
    assert spe_lambdas(timm.create_model('resnet83')) == []
    with pytest.raises(ValueError, match='no SPE'):
        plot_lambdas([], tmp_path / 'x.png')


def test_summary_and_log_of_a_resumed_run_keep_each_epoch_once(tmp_path):
    """train.py writes the summary header again on every resume, and a resumed run's log repeats the epoch
    that was interrupted: each epoch is read once, its last attempt."""
    (tmp_path / 'summary.csv').write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,30.0,80.0,0.1\n1,1.5,1.4,45.0,90.0,0.1\n'
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n2,1.2,1.1,55.0,94.0,0.09\n')
    rows = read_summary(tmp_path / 'summary.csv')
    assert [r['epoch'] for r in rows] == [0, 1, 2] and rows[2]['eval_top1'] == 55.0
    log = tmp_path / 'train.log'
    log.write_text('Train: 1 [ 0/10 (0%)]  Loss: 2.0 (2.0)\nTrain: 1 [ 5/10 (50%)]  Loss: 9.0 (9.0)\n'
                   'Train: 1 [ 0/10 (0%)]  Loss: 1.9 (1.9)\nTrain: 1 [ 5/10 (50%)]  Loss: 1.8 (1.8)\n')
    assert [(p['epoch'], p['loss']) for p in read_train_log(log)] == [(1.0, 1.9), (1.5, 1.8)]


def test_lambdas_skip_layers_with_a_constant_lambda():
    """The Table 3 ablation (``lam=0.3``) has no learned p: inspect lists no lambda for it instead of failing."""
    assert spe_lambdas(timm.create_model('resnet83_spe', attn_kwargs=dict(lam=0.3))) == []
    assert len(spe_lambdas(timm.create_model('resnet83_spe'))) == 27
