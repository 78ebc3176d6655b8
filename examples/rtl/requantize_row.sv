// One row of a static requant node of the integer IR (e.g. `L0.ffn1 = requant(L0.ffn1.acc) ->
// s16 ... static exp=-8`): LANES requantize units (requantize.sv) share the row's input
// exponent; every lane computes y = sat(x >>RND_CONV (EXP_OUT - in0_exp)) (SAT). Port names
// follow the model vector dump (in0, in0_exp, out, out_exp). Latency 1.
module bbct_requantize_row #(
    parameter int LANES = 64,
    parameter int IN_BITS = 42,
    parameter int OUT_BITS = 16,
    parameter int EXP_OUT = -8
) (
    input  logic                         clk,
    input  logic [LANES*IN_BITS-1:0]     in0,
    input  logic signed [15:0]           in0_exp,
    output logic [LANES*OUT_BITS-1:0]    out,
    output logic signed [15:0]           out_exp
);
  localparam logic [2:0] RND_CONV = 3'd5;
  localparam logic [1:0] SAT = 2'd0;
  integer sh;
  logic signed [7:0] shift;
  always @* begin
    sh = EXP_OUT - in0_exp;
    shift = (sh > 127) ? 8'sd127 : (sh < -128) ? -8'sd128 : sh[7:0];
  end
  genvar i;
  generate
    for (i = 0; i < LANES; i = i + 1) begin : lane
      logic ovf;
      bbct_requantize #(.OUT_BITS(OUT_BITS)) u (
          .clk(clk),
          .x({{(64 - IN_BITS) {in0[i*IN_BITS+IN_BITS-1]}}, in0[i*IN_BITS+:IN_BITS]}),
          .shift(shift),
          .rnd(RND_CONV),
          .sat(SAT),
          .y(out[i*OUT_BITS+:OUT_BITS]),
          .ovf(ovf)
      );
    end
  endgenerate
  always @(posedge clk) out_exp <= EXP_OUT;
endmodule
