"""RePoseDM (Khandelwal, "Recurrent Pose Alignment and Gradient Guidance for Pose Guided Image Synthesis"), rebuilt
on PIDM (no code was released; ../shared/reference/reposedm.md):

    stage.py     the method `reposedm`: PIDM's UNet and texture encoder, recurrent pose alignment, the tiny pose
                 estimator; L_simple + L_vlb (+ warp and heatmap losses); DDIM with CFG and gradient guidance
    sampling.py  split and single-image sampling from a run directory, the test set for eval.py
    formats.py   export formats ("pidm": PIDM's checkpoint layout plus the alignment state dict)
    demo.py      RePoseDM and B1 (PIDM) tiny on synthetic people (`make demo-reposedm`)
"""
