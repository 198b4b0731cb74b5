//! Colours and spacing in one place.

use egui::Color32;

/// Errors.
pub const ERROR: Color32 = Color32::from_rgb(235, 87, 87);
/// Notices.
pub const NOTICE: Color32 = Color32::from_rgb(120, 190, 255);
/// Tokens the model verified itself.
pub const VERIFIED: Color32 = Color32::from_rgb(210, 210, 210);
/// Prompt (context) text in previews.
pub const PROMPT: Color32 = Color32::from_rgb(150, 150, 160);
/// Response (target) text in previews.
pub const RESPONSE: Color32 = Color32::from_rgb(120, 220, 140);
/// Mask blocks in previews.
pub const MASK: Color32 = Color32::from_rgb(200, 140, 255);
/// Rejected drafts.
pub const REJECTED: Color32 = Color32::from_rgb(220, 90, 90);
/// Good outcome badges.
pub const GOOD: Color32 = Color32::from_rgb(80, 200, 120);
/// Bad outcome badges.
pub const BAD: Color32 = Color32::from_rgb(235, 87, 87);

/// One colour per accepted draft slot (slot 1 first), cycling after eight.
const SLOTS: [Color32; 8] = [
    Color32::from_rgb(90, 170, 255),
    Color32::from_rgb(255, 170, 60),
    Color32::from_rgb(120, 220, 120),
    Color32::from_rgb(230, 110, 200),
    Color32::from_rgb(250, 230, 90),
    Color32::from_rgb(100, 220, 220),
    Color32::from_rgb(200, 150, 110),
    Color32::from_rgb(170, 140, 255),
];

/// The colour of accepted draft slot `slot` (1-based).
pub fn slot(slot: usize) -> Color32 {
    SLOTS[(slot.max(1) - 1) % SLOTS.len()]
}

/// Series colours for plots.
pub fn series(i: usize) -> Color32 {
    SLOTS[i % SLOTS.len()]
}

/// Global style tweaks (applied every frame; cheap).
pub fn apply(ctx: &egui::Context) {
    ctx.all_styles_mut(|s| {
        s.spacing.item_spacing = egui::vec2(8.0, 6.0);
    });
}
