"""Training and evaluation (work in progress: the adaptation stage lands with the adapters)."""
import torch

from model import AST, ViT, load_ast, load_vit, timm_state_dict

if __name__ == "__main__":
    torch.manual_seed(0)
    vit, ast = ViT().eval(), AST().eval()
    vit2 = load_vit(timm_state_dict(vit), num_heads=4)
    ast2 = load_ast(timm_state_dict(ast, "module.v."), num_mel_bins=64, target_length=100, num_heads=4)
    x, fb = torch.randn(2, 3, 32, 32), torch.randn(2, 100, 64)
    with torch.no_grad():
        print("ViT round trip max diff", (vit.forward_features(x) - vit2.forward_features(x)).abs().max().item())
        print("AST round trip max diff", (ast.forward_features(fb) - ast2.forward_features(fb)).abs().max().item())
